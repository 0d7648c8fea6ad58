"""generate.py end to end (issue 4): the command line in a subprocess on a tiny random checkpoint.

The command must print exactly what the Python API returns, `--method full` must be plain greedy decoding of
the model, `--dump` must write the trace the README documents, and bad flags must end with one line and a
non-zero exit. (Every other bad-input row is in tests/test_errors.py.)
"""
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import cli_io
from conftest import plain_greedy, sample_text
from model import load_model
from parallelcomp import ParallelCompConfig, answer, paper_calibration
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What is the secret code?"


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    """(path of a prompt file that holds only context, its text): ~410 tokens, 7 chunks of at most 60."""
    text = sample_text(random.Random(0), 40)
    path = tmp_path_factory.mktemp("prompt") / "context.txt"
    path.write_text(text, encoding="utf-8")
    return str(path), text


def run_cli(*argv):
    """generate.py in a subprocess: (exit code, stdout, stderr), both decoded as UTF-8."""
    proc = subprocess.run([sys.executable, "generate.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                          timeout=300)
    return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


# ----------------------------------------------------------------------------------------------------
# ParallelComp: the command equals the Python API, and writes the documented trace

def test_cli_equals_python_api_and_dump_is_the_documented_trace(ckpt, context, tmp_path):
    path, text = context
    dump = tmp_path / "trace.safetensors"
    code, out, err = run_cli("--ckpt", ckpt, "--prompt-file", path, "--question", QUESTION, "--device", "cpu",
                             "--max-new-tokens", 12, "--chunk-size", 60, "--keep-chunks", 2, "--kv-capacity", 30,
                             "--calibration", "paper", "--dump", dump)
    assert code == 0, err

    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    cfg = ParallelCompConfig(chunk_size=60, keep_chunks=2, kv_capacity=30, calibration=paper_calibration(2))
    text, question = cli_io.split_question(text, QUESTION)  # what the CLI makes of the file and the flag
    api = answer(model, tok, text, question, cfg, max_new_tokens=12, trace=True)
    assert len(api.ids) > 0
    assert out == api.text + "\n"  # stdout carries the generated text only
    for label in ("input tokens", "chunks", "cache", "prefill", "decode", "peak memory"):  # stats on stderr
        assert f"\n{label} " in err, label

    trace = load_file(str(dump))
    assert set(trace) == set(api.trace)
    for name, value in api.trace.items():
        torch.testing.assert_close(trace[name], value, rtol=0, atol=1e-5, msg=name)

    # the documented names, shapes and dtypes
    prompt = tok.encode_prompt(text, question)  # the whole text encoded once, split at the context's ends
    n, q, c = len(prompt.context), len(prompt.question), len(trace["chunk_bounds"])
    hkv, n_layers, vocab = model.args.n_kv_heads, model.args.n_layers, model.args.vocab_size
    assert trace["context_ids"].tolist() == prompt.context and trace["context_ids"].shape == (n,)
    assert trace["question_ids"].tolist() == prompt.question and trace["question_ids"].shape == (q,)
    bounds = trace["chunk_bounds"].tolist()
    assert trace["chunk_bounds"].shape == (c, 2) and c >= 7
    assert bounds[0][0] == 0 and bounds[-1][1] == n and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(0 < end - start <= 60 for start, end in bounds)
    scores = trace["chunk_scores"]
    assert scores.shape == (c,) and scores.dtype == torch.float32
    kept = trace["kept_chunks"].tolist()
    assert kept == sorted(scores.argsort()[:2].tolist())  # the 2 lowest I_c, in document order
    assert trace["generated_ids"].tolist() == api.ids
    assert trace["first_logits"].shape == (vocab,) and trace["first_logits"].dtype == torch.float32
    assert int(trace["first_logits"].argmax()) == api.ids[0]  # greedy
    assert trace["header_ids"].tolist() == [tok.bos_id]
    assert set(trace) == {"header_ids", "context_ids", "question_ids", "chunk_bounds", "chunk_scores", "kept_chunks",
                          "generated_ids", "first_logits", *(f"{kind}.{layer}" for layer in range(n_layers)
                                                             for kind in ("kv_kept", "calibration_kept"))}
    kept_len = [min(30, bounds[i][1] - bounds[i][0]) for i in kept]
    for layer in range(n_layers):
        kv, cal = trace[f"kv_kept.{layer}"], trace[f"calibration_kept.{layer}"]
        assert kv.shape == (hkv, 1 + sum(kept_len))  # one BOS (offset -1) + per chunk its KV capacity
        assert cal.shape[0] == hkv and cal.shape[1] <= kv.shape[1]
        for head in range(hkv):
            offsets = kv[head].tolist()
            assert offsets[0] == -1 and offsets == sorted(set(offsets))  # header negative; document order
            assert all(any(bounds[i][0] <= o < bounds[i][1] for i in kept) for o in offsets[1:])
            assert set(cal[head].tolist()) <= set(offsets)  # calibration only removes


# ----------------------------------------------------------------------------------------------------
# The full baseline is plain greedy decoding

def test_cli_method_full_equals_plain_greedy_decoding(ckpt, tmp_path):
    prompt = tmp_path / "short.txt"  # fits the 256-token window with the question and the answer
    prompt.write_text(sample_text(random.Random(3), 6) + "\n\n" + QUESTION, encoding="utf-8")
    dump = tmp_path / "trace.safetensors"
    code, out, err = run_cli("--ckpt", ckpt, "--prompt-file", prompt, "--method", "full", "--device", "cpu",
                             "--max-new-tokens", 10, "--dump", dump)
    assert code == 0, err
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    context, question = cli_io.split_question(prompt.read_text(encoding="utf-8"), None)
    prompt = tok.encode_prompt(context, question)
    tokens = prompt.header + prompt.context + prompt.question
    assert len(tokens) + 10 <= model.args.trained_window
    ref = plain_greedy(model, tokens, 10, tok.stop_ids)
    assert len(ref) > 0
    assert load_file(str(dump))["generated_ids"].tolist() == ref
    assert out == tok.decode(ref) + "\n"


def test_cli_instruction_is_read_before_the_context(ckpt, context):
    """--instruction: the model reads instruction + prompt + question (here with --method full, which is
    plain greedy decoding of exactly that text)."""
    path, text = context
    instruction = "Find the code in the text below.\n\n"
    code, out, err = run_cli("--ckpt", ckpt, "--prompt-file", path, "--question", QUESTION, "--device", "cpu",
                             "--method", "full", "--max-new-tokens", 8, "--instruction", instruction)
    assert code == 0, err
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    context_text, question = cli_io.split_question(text, QUESTION)
    prompt = tok.encode_prompt(context_text, question, instruction=instruction)
    tokens = prompt.header + prompt.context + prompt.question
    assert tokens == [tok.bos_id] + tok.encode(instruction + context_text + question)
    ref = plain_greedy(model, tokens, 8, tok.stop_ids)
    assert out == tok.decode(ref) + "\n" and len(ref) > 0


# ----------------------------------------------------------------------------------------------------
# Bad flags end with one line

@pytest.mark.parametrize("argv, words", [
    (["--chunk-size", "ten"], ["--chunk-size: invalid int value"]),  # argparse
    (["--keep-chunks", "0"], ["keep_chunks must be a positive integer"]),  # ConfigError
    (["--top-p", "2"], ["--top-p: must be in (0, 1]"]),  # UsageError
    (["--ckpt", "no/such/folder"], ["does not exist"]),  # CheckpointError
])
def test_bad_flag_is_one_line_and_nonzero_exit(ckpt, context, argv, words):
    code, out, err = run_cli("--ckpt", ckpt, "--prompt-file", context[0], "--question", QUESTION, *argv)
    assert code == 2 and out == ""
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(word in err for word in words), err


# ----------------------------------------------------------------------------------------------------
# Streaming

def test_stream_holds_back_a_character_until_its_last_byte(ckpt, capsys):
    """Byte-fallback tokens decode to U+FFFD until a character is complete; streamed output must not keep
    those, or it would stop matching the final text (and the rest of the answer would be lost)."""
    tok = load_tokenizer(ckpt)
    ids = tok.encode("ab") + [tok.token_id("<0xC3>"), tok.token_id("<0xA9>")] + tok.encode("cd")
    stream = cli_io.Stream()
    for i in range(1, len(ids) + 1):
        stream(tok.decode(ids[:i]))
    stream.finish(tok.decode(ids))
    assert capsys.readouterr().out == "ab\u00e9 cd\n" == tok.decode(ids) + "\n"
    stream = cli_io.Stream()
    stream(tok.decode(ids[:3]))  # "ab" + an incomplete character: held back ...
    stream.finish(tok.decode(ids[:3]))  # ... until the end, where it is what the model said
    assert capsys.readouterr().out == "ab\ufffd\n"


def test_question_flag_never_runs_on_from_the_files_last_word():
    """context + question is one text: a file without a final line end gets one before the question."""
    assert cli_io.split_question("The key is 4.", "What is the key?") == ("The key is 4.\n", "What is the key?")
    assert cli_io.split_question("The key is 4.\n", "What?") == ("The key is 4.\n", "What?")
    assert cli_io.split_question("The key is 4.", " What?") == ("The key is 4.", " What?")
    assert cli_io.split_question("A.\n\nB.\n\nWhat?\n", None) == ("A.\n\nB.\n\n", "What?")

