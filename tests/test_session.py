"""Document sessions (session.py): the document's chunks are encoded once, and every question's run equals a
one-shot parallelcomp.answer run of the same prompt: trace for trace (ids, chunk bounds and scores, kept chunks,
kept KV positions, calibration, first logits, generated tokens). Then the cache file and its refusals."""
import json
import os
import random
import shutil

import pytest
import torch

import parallelcomp as pc
from conftest import edit_json
from demo.passkey import make_example
from model import load_model
from session import CacheError, Document
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo", "model")
QUESTIONS = [" What is the pass key? The pass key is", " Which number is the pass key? The pass key is",
             " What?"]  # the last one is shorter than the observation window: the chunk's tail queries score too


@pytest.fixture(scope="module")
def demo():
    model, tok = load_model(DEMO), load_tokenizer(DEMO)
    context, _, _ = make_example(random.Random(3), tok, 1500, 0.6)
    return model, tok, context


def assert_same_trace(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=0, msg=name)
        else:
            assert torch.equal(got[name], tensor), name


CONFIGS = {
    "plain": dict(chunk_size=240, keep_chunks=2),
    "kv eviction": dict(chunk_size=240, keep_chunks=2, kv_capacity=60, chunk_batch=3),
    "calibration": dict(chunk_size=240, keep_chunks=3, kv_capacity=100, calibration=[("all", 1, 2)],
                        calibration_threshold=0.03),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_question_equals_a_one_shot_run(demo, name):
    model, tok, context = demo
    cfg = pc.ParallelCompConfig(**CONFIGS[name])
    doc = Document.encode(model, tok, context, cfg, questions=QUESTIONS)
    assert len(doc.chunks) > cfg.keep_chunks
    for question in QUESTIONS:
        got = doc.answer(question, max_new_tokens=6, trace=True)
        want = pc.answer(model, tok, context, question, cfg, max_new_tokens=6, trace=True)
        assert_same_trace(got.trace, want.trace)
        assert got.text == want.text
    if cfg.kv_capacity:  # the per-question eviction selected from the full chunk K/V, which stays whole
        assert all(k.shape[1] == 1 + c.end - c.start for c in doc.chunks for k in c.keys)


def test_a_saved_and_loaded_document_answers_as_before(demo, tmp_path):
    model, tok, context = demo
    cfg = pc.ParallelCompConfig(**CONFIGS["kv eviction"])
    doc = Document.encode(model, tok, context, cfg, questions=QUESTIONS[:1])
    path = str(tmp_path / "doc.safetensors")
    assert doc.save(path) == os.path.getsize(path) > doc.kv_bytes()
    assert os.listdir(tmp_path) == ["doc.safetensors"]  # no temporary file left behind
    umask = os.umask(0o027)
    try:  # the usual mode for the umask (safetensors alone writes 0600)
        doc.save(path)
        assert os.stat(path).st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
    loaded = Document.load(path, model, tok, context, pc.ParallelCompConfig(keep_chunks=2, kv_capacity=60))
    assert_same_trace(loaded.answer(QUESTIONS[1], max_new_tokens=6, trace=True).trace,
                      pc.answer(model, tok, context, QUESTIONS[1], cfg, max_new_tokens=6, trace=True).trace)


def test_a_session_over_a_chat_template_equals_one_shot(tmp_path, bpe_tokenizer_dir):
    from conftest import make_checkpoint
    from test_chat import LLAMA3_TEMPLATE
    path = make_checkpoint(str(tmp_path / "chat"), vocab_size=640, max_position_embeddings=512)
    for name in os.listdir(bpe_tokenizer_dir):
        shutil.copy(os.path.join(bpe_tokenizer_dir, name), path)
    edit_json(path, "tokenizer_config.json", chat_template=LLAMA3_TEMPLATE)
    model, tok = load_model(path), load_tokenizer(path)
    context = "The grass is green. The sky is blue. " * 40 + "The code is 4411. " + "The sun is warm. " * 40
    cfg = pc.ParallelCompConfig(chunk_size=100, keep_chunks=1, kv_capacity=50)
    questions = ["What is the code?", "What colour is the sky?"]
    doc = Document.encode(model, tok, context, cfg, chat=True, questions=questions)
    for question in questions:
        assert_same_trace(doc.answer(question, max_new_tokens=4, trace=True).trace,
                          pc.answer(model, tok, context, question, cfg, chat=True, max_new_tokens=4, trace=True).trace)


def test_a_cache_for_something_else_is_refused(demo, tmp_path):
    model, tok, context = demo
    doc = Document.encode(model, tok, context, pc.ParallelCompConfig(chunk_size=240), questions=QUESTIONS[:1])
    path = str(tmp_path / "doc.safetensors")
    doc.save(path)
    with pytest.raises(CacheError, match="another text"):
        Document.load(path, model, tok, context + " More.")
    with pytest.raises(CacheError, match="another text"):
        Document.load(path, model, tok, context, instruction="Read this. ")
    with pytest.raises(CacheError, match="chunk_size 240, not 300"):
        Document.load(path, model, tok, context, pc.ParallelCompConfig(chunk_size=300))
    with pytest.raises(CacheError, match="another dtype"):
        Document.load(path, load_model(DEMO, dtype=torch.bfloat16), tok, context)
    other = load_model(DEMO)
    with torch.no_grad():
        other.layers[-1].feed_forward.w2.weight[0, 0] += 1.0
    with pytest.raises(CacheError, match="another checkpoint"):
        Document.load(path, other, tok, context)
    data = open(path, "rb").read()
    for name, damaged in (("truncated", data[:len(data) // 2]), ("garbage", b"\x07" * 64), ("empty", b"")):
        bad = str(tmp_path / f"{name}.safetensors")
        with open(bad, "wb") as f:
            f.write(damaged)
        with pytest.raises(CacheError, match="damaged"):
            Document.load(bad, model, tok, context)
    with pytest.raises(CacheError, match="not found"):
        Document.load(str(tmp_path / "missing.safetensors"), model, tok, context)


def test_an_interrupted_save_leaves_no_file(demo, tmp_path, monkeypatch):
    model, tok, context = demo
    doc = Document.encode(model, tok, context, pc.ParallelCompConfig(chunk_size=240), questions=QUESTIONS[:1])
    import session

    def fail(tensors, filename, metadata):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(session, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        doc.save(str(tmp_path / "doc.safetensors"))
    assert os.listdir(tmp_path) == []


def cli(*argv, env=None):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "generate.py", "--ckpt", DEMO, *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def test_cli_questions_file_gives_one_json_line_per_question(demo, tmp_path):
    model, tok, context = demo
    (tmp_path / "p.txt").write_text(context)
    long = " ".join(["pass key"] * 300)  # longer than the demo model's 256-token window
    (tmp_path / "q.txt").write_text(f"What is the pass key?\n\n   \n{long}\nWhich number is it?\n")
    cache = tmp_path / "doc.safetensors"
    proc = cli("--prompt-file", tmp_path / "p.txt", "--questions-file", tmp_path / "q.txt", "--max-new-tokens", 5,
               "--chunk-size", 200, "--kv-capacity", 80, "--save-cache", cache)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["question"] for line in lines] == ["What is the pass key?", long, "Which number is it?"]
    assert "answer" in lines[0] and "answer" in lines[2] and "longer than the model's trained window" in lines[1]["error"]
    cfg = pc.ParallelCompConfig(chunk_size=200, kv_capacity=80)
    for line in lines[::2]:  # each answer is the one-shot answer (the CLI starts the question on a new line)
        assert line["answer"] == pc.answer(model, tok, context + "\n", line["question"], cfg, max_new_tokens=5).text
    assert "K/V is held" in proc.stderr and "document cache written" in proc.stderr
    again = cli("--prompt-file", tmp_path / "p.txt", "--questions-file", tmp_path / "q.txt", "--max-new-tokens", 5,
                "--kv-capacity", 80, "--load-cache", cache)
    assert again.returncode == 0 and again.stdout == proc.stdout, again.stderr
    (tmp_path / "p.txt").write_text(context + " Changed.")
    refused = cli("--prompt-file", tmp_path / "p.txt", "--question", "Why?", "--load-cache", cache)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [f"error: {cache} was written for another text (prompt file, "
                                                   "--instruction or --chat); encode the document again (--save-cache)"]


def test_cli_sessions_under_torchrun_are_refused(tmp_path):
    (tmp_path / "p.txt").write_text("Some text. " * 20)
    env = dict(os.environ, RANK="0", WORLD_SIZE="2")
    proc = cli("--prompt-file", tmp_path / "p.txt", "--questions-file", tmp_path / "p.txt", env=env)
    assert proc.returncode == 2 and "run in one process; launch without torchrun" in proc.stderr
