"""Bad input never crashes, hangs or lies; long input never runs out of memory (issue 6).

Every row ends the same way for the user: exit code 2 and one line on stderr, `error: <what is wrong>; <what
to do>` (warnings may precede it), never a traceback. Most rows call `generate.main` in-process (it returns
the exit code and prints what the command line would); the rows that are about the process itself (signals,
memory, determinism) run `generate.py` in a subprocess. Sections: the checkpoint folder, the prompt and the
question, option values, long and short prompts, Ctrl-C, determinism, tokenizer fuzzing, untrusted files.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli_io
import generate
from conftest import edit_json, make_checkpoint, only_pickled_weights, rewrite_weights, sample_text, truncate_weights
from model import load_model
from parallelcomp import answer
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo", "model")
FAST = ["--max-new-tokens", "4"]  # leaves the tiny checkpoints' 256-token window room for chunks


@pytest.fixture(scope="module")
def prompt(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt") / "prompt.txt"
    path.write_text(sample_text(random.Random(0), 40) + "\n\nWhat is the secret code?", encoding="utf-8")
    return str(path)


def cli(capsys, *argv):
    """generate.main in-process: (exit code, stdout, stderr)."""
    code = generate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(code: int, err: str) -> str:
    """The single `error: ...` line of a failed run, after checking that there is nothing else but warnings."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert code == 2, err
    return lines[0]


def fails_with(capsys, words, *argv) -> str:
    line = error_line(*cli(capsys, *argv)[::2])
    for word in words:
        assert word in line, (word, line)
    return line


def copy(folder, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(folder, dst)
    return dst


# ----------------------------------------------------------------------------------------------------
# The checkpoint folder

CHECKPOINT_ROWS = {  # name -> (damage(folder), words the error line must contain)
    "no_config_json": (lambda d: os.remove(os.path.join(d, "config.json")), ["config.json", "not found"]),
    "config_not_json": (lambda d: open(os.path.join(d, "config.json"), "w").write("{'model_type': llama"),
                        ["config.json", "not valid JSON", "re-download"]),
    "config_not_an_object": (lambda d: open(os.path.join(d, "config.json"), "w").write("[1, 2]"),
                             ["config.json", "not a JSON object"]),
    "unsupported_model_type": (lambda d: edit_json(d, "config.json", model_type="gpt2"),
                               ["config.json", "'gpt2' is not supported", "llama"]),
    "no_safetensors": (lambda d: os.remove(os.path.join(d, "model.safetensors")), ["no model.safetensors"]),
    "truncated_safetensors": (lambda d: truncate_weights(d, lambda n: n // 2), ["model.safetensors", "truncated"]),
    "truncated_header": (lambda d: truncate_weights(d, lambda n: 5), ["model.safetensors", "truncated"]),
    "wrong_shape": (lambda d: rewrite_weights(d, lambda t: {**t, "model.layers.0.self_attn.k_proj.weight":
                                                            torch.zeros(64, 64)}),
                    ["k_proj.weight", "(64, 64)", "(32, 64)"]),
    "missing_tensor": (lambda d: rewrite_weights(d, lambda t: {k: v for k, v in t.items() if "1.mlp.up" not in k}),
                       ["missing", "model.layers.1.mlp.up_proj.weight", "incomplete"]),
    "extra_tensor": (lambda d: rewrite_weights(d, lambda t: {**t, "model.layers.2.mlp.up_proj.weight":
                                                             torch.zeros(128, 64)}),
                     ["unexpected", "model.layers.2.mlp.up_proj.weight"]),
    "only_pickled_weights": (only_pickled_weights, [".bin", "safetensors only"]),
    "no_tokenizer_file": (lambda d: os.remove(os.path.join(d, "tokenizer.model")),
                          ["no tokenizer.model or tokenizer.json", "copy the tokenizer"]),
    "tokenizer_not_sentencepiece": (lambda d: open(os.path.join(d, "tokenizer.model"), "wb").write(b"<html>"),
                                    ["tokenizer.model", "not a SentencePiece model"]),
    "tokenizer_json_garbage": (lambda d: open(os.path.join(d, "tokenizer.json"), "w").write("{\"model\": 3}"),
                               ["tokenizer.json", "cannot be read"]),
}


@pytest.mark.parametrize("row", list(CHECKPOINT_ROWS))
def test_broken_checkpoint_is_one_line(capsys, ckpt, prompt, tmp_path, row):
    damage, words = CHECKPOINT_ROWS[row]
    folder = copy(ckpt, tmp_path)
    damage(folder)
    fails_with(capsys, words, "--ckpt", folder, "--prompt-file", prompt, *FAST)


def test_missing_checkpoint_folder(capsys, prompt, tmp_path):
    fails_with(capsys, ["nowhere", "does not exist"], "--ckpt", tmp_path / "nowhere", "--prompt-file", prompt)


def test_shard_listed_in_index_but_absent(capsys, sp_model, prompt, tmp_path):
    folder = make_checkpoint(str(tmp_path / "sharded"), sp_model, max_shard_size="200KB")
    capsys.readouterr()  # transformers' progress bar
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 1
    os.remove(os.path.join(folder, shards[-1]))
    fails_with(capsys, [shards[-1], "missing", "download it"], "--ckpt", folder, "--prompt-file", prompt, *FAST)


def test_tokenizer_larger_than_the_model_vocabulary(capsys, sp_model, prompt, tmp_path):
    folder = make_checkpoint(str(tmp_path / "small_vocab"), sp_model, vocab_size=300)  # tokenizer: 512 pieces
    capsys.readouterr()  # transformers' progress bar
    fails_with(capsys, ["512 tokens", "300", "belong to another model"],
               "--ckpt", folder, "--prompt-file", prompt, *FAST)


# ----------------------------------------------------------------------------------------------------
# The prompt file and the question

def write(tmp_path, data: bytes, name="p.txt") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


TEXT = "The grass is green. The sky is blue.\n\nWhat is the secret code?".encode()
PROMPT_ROWS = {  # name -> (file contents, words)
    "empty": (b"", ["is empty"]),
    "only_whitespace": (b" \n\n\t \n", ["is empty"]),
    "binary_nul_bytes": (bytes(range(256)) * 8, ["looks binary", "UTF-8 text file"]),
    "pdf_saved_as_txt": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Length 3 >>\nstream\n\x78\x9c\x00\x01\xff"
                         b"\nendstream\n", ["looks binary"]),
    "mostly_undecodable": (bytes(random.Random(0).randrange(128, 256) for _ in range(4000)), ["is not text"]),
    "utf16": ("The sky is blue.\n\nWhat?".encode("utf-16"), ["UTF-16", "iconv"]),
    "no_question_paragraph": (b"One line only, and no blank line before a question.", ["no question given"]),
}


@pytest.mark.parametrize("row", list(PROMPT_ROWS))
def test_bad_prompt_file_is_one_line(capsys, ckpt, tmp_path, row):
    data, words = PROMPT_ROWS[row]
    fails_with(capsys, words, "--ckpt", ckpt, "--prompt-file", write(tmp_path, data), *FAST)


def test_missing_prompt_file_and_directory(capsys, ckpt, tmp_path):
    fails_with(capsys, ["absent.txt", "not found"], "--ckpt", ckpt, "--prompt-file", tmp_path / "absent.txt")
    fails_with(capsys, ["is a directory"], "--ckpt", ckpt, "--prompt-file", tmp_path)


def test_huge_or_endless_prompt_is_refused_without_reading_it_all(capsys, ckpt, tmp_path):
    """A 2 GB log file must not be read into memory: at most --max-prompt-mb (default 64) is ever read."""
    fails_with(capsys, ["larger than 0.01 MiB", "--max-prompt-mb"],
               "--ckpt", ckpt, "--prompt-file", write(tmp_path, TEXT * 1000), "--max-prompt-mb", "0.01")
    if os.path.exists("/dev/zero"):  # never ends: must not hang
        fails_with(capsys, ["larger than 64 MiB"], "--ckpt", ckpt, "--prompt-file", "/dev/zero")


def test_a_few_undecodable_bytes_are_replaced_with_a_warning(capsys, ckpt, tmp_path):
    """Decision (README, Troubleshooting): a file that is mostly UTF-8 runs, each bad byte becomes U+FFFD and
    one warning line says how many there were; a file that is mostly not UTF-8 is refused (above)."""
    path = write(tmp_path, b"\xef\xbb\xbfCaf\xe9 au lait. The sky is blue.\n\nWhat is the secret code?")
    code, out, err = cli(capsys, "--ckpt", ckpt, "--prompt-file", path, *FAST)
    assert code == 0, err
    assert err.splitlines()[0] == f"warning: {path} is not valid UTF-8; 1 undecodable bytes replaced with U+FFFD"
    assert cli_io.read_prompt(path, 1).startswith("Caf\ufffd au lait.")  # and the byte-order mark is dropped


@pytest.mark.parametrize("argv, words", [
    (["--question", ""], ["question is empty"]),
    (["--question", " \n "], ["question is empty"]),
    (["--question", "bad \udcff byte"], ["--question is not valid UTF-8"]),  # how Python passes on non-UTF-8 argv
    (["--question", "q", "--question-file", "q.txt"], ["give one of --question, --question-file and --questions-file"]),
    (["--question", "word " * 300], ["tokens, longer than the model's trained window (256)"]),
    (["--question", " the" * 220, "--max-new-tokens", "60"], ["(220 tokens) plus max_new_tokens (60) leave no room"]),
])
def test_bad_question_is_one_line(capsys, ckpt, prompt, argv, words):
    fails_with(capsys, words, "--ckpt", ckpt, "--prompt-file", prompt, *argv)


def test_empty_question_file(capsys, ckpt, prompt, tmp_path):
    fails_with(capsys, ["question file", "is empty"], "--ckpt", ckpt, "--prompt-file", prompt,
               "--question-file", write(tmp_path, b"\n", "q.txt"))


# ----------------------------------------------------------------------------------------------------
# Option values

@pytest.mark.parametrize("argv, words", [
    (["--max-new-tokens", "0"], ["--max-new-tokens: must be at least 1"]),
    (["--temperature", "-1"], ["--temperature: must be >= 0"]),
    (["--temperature", "nan"], ["--temperature: must be >= 0"]),
    (["--top-p", "0"], ["--top-p: must be in (0, 1]"]),
    (["--top-p", "1.5"], ["--top-p: must be in (0, 1]"]),
    (["--seed", "-1"], ["--seed: must be in [0, 2^63)"]),
    (["--max-prompt-mb", "0"], ["--max-prompt-mb: must be positive"]),
    (["--chunk-size", "0"], ["chunk_size must be a positive integer, got 0"]),
    (["--keep-chunks", "-2"], ["keep_chunks must be a positive integer, got -2"]),
    (["--kv-capacity", "0"], ["kv_capacity must be a positive integer"]),
    (["--kv-capacity", "50", "--chunk-size", "20"], ["kv_capacity (50) is larger than a chunk (20 tokens)"]),
    (["--kv-capacity", "1000"], ["kv_capacity (1000) is larger than a chunk"]),  # the default chunk size
    (["--window", "0"], ["window must be a positive integer"]),
    (["--chunk-batch", "0"], ["chunk_batch must be a positive integer"]),
    (["--calibration", "middle"], ["'middle' is not REGION:FIRST-LAST"]),
    (["--calibration", "centre:1-2"], ["region 'centre' unknown", "sink, recent, middle, all"]),
    (["--calibration", "sink:1-3"], ["layers 1-3 are outside the model's layers 1-2"]),
    (["--calibration", "sink:2-1"], ["layers 2-1 are outside"]),
    (["--calibration", "sink:1-2,recent:2"], ["layer 2 is covered by two calibration rules"]),
    (["--calibration-threshold", "0"], ["calibration_threshold must be in (0, 1]"]),
    (["--calibration-threshold", "1.5"], ["calibration_threshold must be in (0, 1]"]),
    (["--chunk-size", "ten"], ["--chunk-size: invalid int value: 'ten'"]),  # argparse, made one line
    (["--method", "fast"], ["--method: invalid choice: 'fast'"]),
    (["--device", "tpu"], ["--device: invalid choice: 'tpu'"]),
    (["--dtype", "float16", "--device", "cpu"], ["float16 is not supported on CPU"]),
])
def test_option_out_of_range_is_one_line(capsys, ckpt, prompt, argv, words):
    try:
        code, _, err = cli(capsys, "--ckpt", ckpt, "--prompt-file", prompt, *FAST, *argv)
    except SystemExit as e:  # argparse exits from inside main; as a command this is exit code 2
        code, err = e.code, capsys.readouterr().err
    line = error_line(code, err)
    for word in words:
        assert word in line, (word, line)


def test_missing_required_flags(capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--prompt-file", "x"])
    assert "the following arguments are required: --ckpt" in error_line(e.value.code, capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(capsys, ckpt, prompt):
    fails_with(capsys, ["--device cuda", "no CUDA GPU", "--device cpu"],
               "--ckpt", ckpt, "--prompt-file", prompt, "--device", "cuda")


def test_dump_path_that_cannot_be_written(capsys, ckpt, prompt, tmp_path):
    """Checked before the run, so hours of prefill are not lost to a typo in the path."""
    for path in (tmp_path / "no_such_folder" / "trace.safetensors", tmp_path):
        fails_with(capsys, [f"--dump {path}: cannot write there"],
                   "--ckpt", ckpt, "--prompt-file", prompt, "--dump", path, *FAST)
    cli_io.check_writable(str(tmp_path / "fine.safetensors"))
    assert os.listdir(tmp_path) == []  # checking a good path leaves nothing behind


# ----------------------------------------------------------------------------------------------------
# Short and long prompts

def stats(err: str) -> dict:
    """The closing stats block on stderr as {label: text}."""
    return dict(re.findall(r"^(\w[\w ]*?)\s{2,}(.*)$", err, flags=re.M))


def test_prompt_shorter_than_one_chunk(capsys, ckpt, tmp_path):
    """One chunk: ParallelComp without eviction or calibration equals the plain model (the full baseline)."""
    path = write(tmp_path, TEXT)
    code, out, err = cli(capsys, "--ckpt", ckpt, "--prompt-file", path, "--max-new-tokens", "8")
    assert code == 0, err
    assert stats(err)["chunks"].startswith("1 kept of 1 ")
    code, full, err = cli(capsys, "--ckpt", ckpt, "--prompt-file", path, "--max-new-tokens", "8", "--method", "full")
    assert code == 0 and out == full and out.strip(), (out, full)


def run_measured(cmd, timeout):
    """Run a command; returns (exit code, stdout, stderr, peak RSS in bytes of that process alone)."""
    out_path, err_path = [os.path.join(os.path.dirname(cmd[-1]), name) for name in ("out", "err")]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while True:  # os.wait4 gives this child's own peak RSS (RUSAGE_CHILDREN is the max over all children)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"did not finish in {timeout} s")
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    with open(out_path, encoding="utf-8") as out, open(err_path, encoding="utf-8") as err:
        return proc.returncode, out.read(), err.read(), usage.ru_maxrss * 1024


@pytest.fixture(scope="module")
def million(tmp_path_factory):
    """A prompt file of just over 1,000,000 tokens of varied sentences (3.9M characters), and a question."""
    path = tmp_path_factory.mktemp("million") / "prompt.txt"
    path.write_text(sample_text(random.Random(1), 100_000) + "\n\nWhat is the secret code?", encoding="utf-8")
    return str(path)


def test_a_million_tokens_on_cpu_in_bounded_memory(tmp_path):
    """The demo model (trained on 256-token inputs) finds a passkey in a 1,000,000-token haystack: 3,900x its
    window. Anything that grew with the input (full-vocabulary logits: 2 GB here; an N x N mask: 4 TB)
    would break the memory bound; measured peak RSS and time are in the README."""
    from demo.passkey import make_example
    context, question, answer = make_example(random.Random(5), load_tokenizer(DEMO), 1_000_000, depth=0.7)
    prompt = tmp_path / "haystack.txt"
    prompt.write_text(context + "\n" + question, encoding="utf-8")  # the last paragraph is the question
    code, out, err, peak = run_measured(
        [sys.executable, "generate.py", "--ckpt", DEMO, "--device", "cpu", "--max-new-tokens", "8",
         "--keep-chunks", "1", "--prompt-file", str(prompt)], timeout=600)
    assert code == 0, err
    info = stats(err)
    assert int(info["input tokens"]) > 999_000
    kept, total = re.match(r"(\d+) kept of (\d+) ", info["chunks"]).groups()
    assert kept == "1" and int(total) > 4000
    assert out.strip() == answer
    assert peak < 1.0 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------------------------------
# Ctrl-C

def test_ctrl_c_during_prefill_exits_130_without_traceback(ckpt, million):
    # a shell's background job starts with SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # give the child the default disposition, as a terminal would
    proc = subprocess.Popen([sys.executable, "generate.py", "--ckpt", ckpt, "--device", "cpu", "--prompt-file",
                             million, "--max-new-tokens", "8"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:  # without a terminal, progress comes as a line per 10% of the chunks
        seen.append(line)
        if line.startswith("prefill "):
            break
    assert seen and seen[-1].startswith("prefill "), "".join(seen)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    assert "--- parallelcomp ---" not in err  # it stopped during the prefill, not after


# ----------------------------------------------------------------------------------------------------
# Determinism

def test_same_command_twice_gives_identical_bytes(ckpt, prompt):
    """Greedy, and sampling with a fixed seed: separate processes, byte-identical stdout."""
    base = [sys.executable, "generate.py", "--ckpt", ckpt, "--prompt-file", prompt, "--device", "cpu",
            "--max-new-tokens", "24", "--chunk-size", "60"]
    outs = {}
    for name, extra in (("greedy", []), ("sampled", ["--temperature", "1.0", "--top-p", "0.95", "--seed", "7"])):
        runs = [subprocess.run(base + extra, cwd=ROOT, capture_output=True, timeout=120) for _ in range(2)]
        assert all(r.returncode == 0 for r in runs), runs[0].stderr.decode()
        assert runs[0].stdout == runs[1].stdout, name
        outs[name] = runs[0].stdout
    assert outs["greedy"] != outs["sampled"]  # the sampling flags took effect
    assert len(outs["greedy"].decode()) > 10


# ----------------------------------------------------------------------------------------------------
# Tokenizer fuzzing

def random_text(rng: random.Random, n: int) -> str:
    """Random Unicode scalar values: ASCII, C0/C1 control characters (NUL included), odd whitespace and
    invisible characters, the whole BMP but surrogates, and astral planes (emoji, private use, unassigned)."""
    controls = [chr(c) for c in [*range(0x20), 0x7f, *range(0x80, 0xa0)]]
    spaces = list(" \t\n\r\v\f\u00a0\u1680\u2028\u2029\u3000\ufeff\u200b\u200d\u2581")

    def char():
        r = rng.random()
        if r < 0.3:
            return chr(rng.randint(0x20, 0x7e))
        if r < 0.45:
            return rng.choice(controls)
        if r < 0.55:
            return rng.choice(spaces)
        if r < 0.8:
            c = rng.randint(0xa0, 0xffff)
            return chr(c) if not 0xd800 <= c <= 0xdfff else "\ufffd"
        return chr(rng.randint(0x10000, 0x10ffff))
    return "".join(char() for _ in range(n))


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_tokenizer_round_trip_fuzzing_never_crashes(ckpt, bpe_tokenizer_dir, kind):
    """encode/decode of random Unicode, control characters and a 200,000-character line: no crash, ids inside
    the vocabulary, exact round trip. (SentencePiece writes spaces as U+2581 "▁", so that one character comes
    back as a space: a property of SentencePiece, not a crash.)"""
    tok = load_tokenizer(ckpt if kind == "sentencepiece" else bpe_tokenizer_dir)
    same = (lambda s: s.replace("\u2581", " ")) if kind == "sentencepiece" else (lambda s: s)
    rng = random.Random(0)
    texts = [random_text(rng, rng.randint(0, 400)) for _ in range(300)]
    texts += ["", "\x00", "\n" * 5000, random_text(rng, 200_000).replace("\n", " ")]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == same(text), repr(text[:80])
    assert tok.token_texts  # every id has a text, byte tokens included


def test_random_unicode_prompt_runs_end_to_end(capsys, ckpt, tmp_path):
    rng = random.Random(5)
    text = random_text(rng, 1500).replace("\x00", "") + "\n\nWhat is the secret code?"
    path = write(tmp_path, text.encode())
    code, out, err = cli(capsys, "--ckpt", ckpt, "--prompt-file", path, *FAST)
    assert code == 0, err
    context, question = cli_io.split_question(cli_io.read_prompt(path, 64), None)
    assert question == "What is the secret code?" and len(context) > 1000  # the text reached the model whole
    result = answer(load_model(ckpt), load_tokenizer(ckpt), context, question, max_new_tokens=4)
    assert out == result.text + "\n"  # the same answer as the Python API on that text
    assert f"input tokens      {result.stats['input_tokens']}\n" in err


# ----------------------------------------------------------------------------------------------------
# Nothing from a checkpoint folder is unpickled or executed

def project_sources():
    skip = {".venv", ".git", "tests", "__pycache__", "cache"}  # eval/cache: downloads, git-ignored
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip]
        yield from (os.path.join(folder, f) for f in files if f.endswith(".py") and f != "conftest.py")


def test_nothing_unpickles_or_executes_checkpoint_files():
    """safetensors, JSON and SentencePiece/`tokenizers` files only; no pickle, no torch.load, no remote code,
    no exec/eval. (conftest.py and the tests may use transformers, which never sees user folders.)"""
    banned = re.compile(r"torch\.load|\bpickle\b|trust_remote_code|(?<![\w.])(exec|eval)\(|weights_only|"
                        r"jinja2\.Environment")
    hits = []
    for path in project_sources():
        with open(path, encoding="utf-8") as f:
            hits += [f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}"
                     for i, line in enumerate(f, 1) if banned.search(line)]
    assert not hits, "\n".join(hits)
    assert os.path.join(ROOT, "generate.py") in set(project_sources())


def test_pickled_checkpoint_is_refused_not_loaded(capsys, ckpt, prompt, tmp_path):
    """A folder with only a .bin (a pickle: loading one can run any code) gets one line instead."""
    folder = copy(ckpt, tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    marker = tmp_path / "pwned"
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:  # a pickle that runs a shell command
        f.write(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    fails_with(capsys, ["only pickled weights", "safetensors"], "--ckpt", folder, "--prompt-file", prompt)
    assert not marker.exists()


def test_chat_template_runs_in_a_sandbox(capsys, ckpt, prompt, tmp_path):
    """tokenizer_config.json's chat template is Jinja: rendered in jinja2's sandbox, as transformers does, so a
    template cannot reach Python objects (a plain jinja2.Environment would run this one's shell command)."""
    folder = copy(ckpt, tmp_path)
    marker = tmp_path / "pwned"
    evil = ("{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
            "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    edit_json(folder, "tokenizer_config.json", chat_template=evil)
    fails_with(capsys, ["--chat", "chat template", "unsafe", "drop --chat"],
               "--ckpt", folder, "--prompt-file", prompt, "--chat", *FAST)
    assert not marker.exists()
    edit_json(folder, "tokenizer_config.json", chat_template="[INST] {{ messages[0]['content'] }} [/INST]")
    code, out, err = cli(capsys, "--ckpt", folder, "--prompt-file", prompt, "--chat", *FAST)
    assert code == 0, err
    tok = load_tokenizer(folder)  # the benign template rendered: its text around the user message, once
    context, question = cli_io.split_question(cli_io.read_prompt(prompt, 64), None)
    ids = tok.encode_prompt(context, question, chat=True)
    assert tok.decode(ids.header).startswith("[INST]") and tok.decode(ids.question).endswith(question + " [/INST]")
    assert out == answer(load_model(folder), tok, context, question, chat=True, max_new_tokens=4).text + "\n"
