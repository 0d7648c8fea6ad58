"""Chunk prefill over 2 processes (issue 11): torchrun, gloo on CPU, the committed demo model, float32.

Two ranks must give what one process gives: the same chunk scores (1e-5), kept chunks, kept KV positions and
generated tokens, through the Python API (five configurations in one launch) and through `torchrun generate.py`.
A rank that raises or dies must end every rank with a non-zero exit and one message from rank 0, not a hang.

This file is also the script torchrun starts: `python tests/test_distributed.py api OUT` runs the API cases on
every rank and saves rank 0's results; `... fail|kill ARGV` runs generate.py with rank 1's prefill broken.
"""
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

CKPT = os.path.join(ROOT, "demo", "model")
REPEATED = "The grass is green and the sky is blue. " * 32  # chunks 1, 3, 5 (51 tokens) tie; so do 0, 2, 4, 6, 7


def cases():
    """name -> (context, question, config kwargs, what the case is about)."""
    from demo.passkey import make_example
    from tokenizer import load_tokenizer
    context, question, _ = make_example(random.Random(0), load_tokenizer(CKPT), 2000, 0.37)  # 9 chunks of 241
    return {
        "eviction+calibration": (context, question, dict(keep_chunks=3, kv_capacity=50, calibration="paper")),
        "plain": (context, question, dict(keep_chunks=2, chunk_batch=3)),
        "one chunk, rank 0 idle": (context[:400], question, dict(keep_chunks=3, kv_capacity=40)),
        "keep more than a share": (context, question, dict(keep_chunks=6, kv_capacity=50, chunk_batch=2)),
        "tied scores": (REPEATED, "What colour is the sky?", dict(chunk_size=68, keep_chunks=4, chunk_batch=1)),
    }


def run_case(model, tokenizer, case, group=None):
    from parallelcomp import ParallelCompConfig, answer, paper_calibration
    context, question, kw = case
    if kw.get("calibration") == "paper":
        kw = dict(kw, calibration=paper_calibration(model.args.n_layers))
    return answer(model, tokenizer, context, question, ParallelCompConfig(**kw), max_new_tokens=6, trace=True,
                  group=group)


TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(*argv, timeout=120):
    """Two gloo ranks. KNOWN BUG, not yet understood: about 1 launch in 10 here, a rank aborts with
    TEARDOWN_ABORT while leaving the process group after its work is done; such a launch is run once more
    (every result is still checked), so the suite does not fail on it. See the README's torchrun section."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for attempt in range(2):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               "2", *map(str, argv)], cwd=ROOT, env=env, capture_output=True, timeout=timeout)
        if TEARDOWN_ABORT not in proc.stderr.decode(errors="replace"):
            break
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def assert_same_as_one_process(one: dict, two: dict, n_ranks: int = 2):
    """`two` (a distributed trace) equals `one` (a single-process trace), plus chunk_rank."""
    assert set(two) == set(one) | {"chunk_rank"}
    torch.testing.assert_close(two["chunk_scores"], one["chunk_scores"], atol=1e-5, rtol=0)
    torch.testing.assert_close(two["first_logits"], one["first_logits"], atol=1e-4, rtol=0)
    for name in one:
        if name not in ("chunk_scores", "first_logits"):
            assert torch.equal(two[name], one[name]), name  # ids, bounds, kept chunks, kept KV positions
    n = len(one["chunk_scores"])
    assert two["chunk_rank"].tolist() == [r for r in range(n_ranks) for _ in range(r * n // n_ranks,
                                                                                    (r + 1) * n // n_ranks)]


# ----------------------------------------------------------------------------------------------------
# Two ranks equal one process

def test_python_api_on_two_ranks_equals_one_process(tmp_path):
    code, out, err = torchrun(__file__, "api", tmp_path)
    assert code == 0, err[-3000:]
    assert out == ""  # nothing on stdout from any rank
    from model import load_model
    from tokenizer import load_tokenizer
    model, tokenizer = load_model(CKPT), load_tokenizer(CKPT)
    for i, (name, case) in enumerate(cases().items()):
        one = run_case(model, tokenizer, case)
        two = torch.load(tmp_path / f"{i}.pt")
        assert two["ids"] == one.ids, name
        assert_same_as_one_process(one.trace, two["trace"])
        assert two["stats"]["ranks"] == 2 and len(two["stats"]["rank_prefill_s"]) == 2
        if name == "one chunk, rank 0 idle":
            assert two["trace"]["chunk_rank"].tolist() == [1] and two["stats"]["kv_bytes_moved"] > 0
        if name == "tied scores":
            scores = one.trace["chunk_scores"].tolist()
            assert scores[1] == scores[3] == scores[5] and scores[0] == scores[2] == scores[4] == scores[6]
            assert one.trace["kept_chunks"].tolist() == [0, 1, 3, 5]  # ties: the earlier chunk, across ranks too
        if name == "keep more than a share":
            assert len(one.trace["kept_chunks"]) == 6


def test_torchrun_generate_equals_one_process(tmp_path):
    from generate import read_prompt
    from model import load_model
    from parallelcomp import ParallelCompConfig, answer, paper_calibration
    from tokenizer import load_tokenizer
    context, question, _ = cases()["eviction+calibration"]
    (tmp_path / "prompt.txt").write_text(context, encoding="utf-8")
    (tmp_path / "question.txt").write_text(question, encoding="utf-8")
    dump = tmp_path / "trace.safetensors"
    code, out, err = torchrun("generate.py", "--ckpt", CKPT, "--prompt-file", tmp_path / "prompt.txt",
                              "--question-file", tmp_path / "question.txt", "--device", "cpu", "--max-new-tokens", 6,
                              "--keep-chunks", 3, "--kv-capacity", 50, "--calibration", "paper", "--dump", dump)
    assert code == 0, err[-3000:]
    model, tokenizer = load_model(CKPT), load_tokenizer(CKPT)
    cfg = ParallelCompConfig(keep_chunks=3, kv_capacity=50, calibration=paper_calibration(model.args.n_layers))
    one = answer(model, tokenizer, context, read_prompt(str(tmp_path / "question.txt"), 1), cfg, max_new_tokens=6,
                 trace=True)
    assert out == one.text + "\n"  # rank 0 streamed it once; rank 1 wrote nothing
    assert err.count("--- parallelcomp ---") == 1 and "ranks             2: chunk prefill" in err
    assert "prefill 9/9 chunks" in err  # progress counts both ranks' chunks
    from safetensors.torch import load_file
    assert_same_as_one_process(one.trace, load_file(dump))


# ----------------------------------------------------------------------------------------------------
# Failures end every rank, with one message

def generate_argv(tmp_path):
    context, question, _ = cases()["plain"]
    (tmp_path / "prompt.txt").write_text(context, encoding="utf-8")
    return ["--ckpt", CKPT, "--prompt-file", tmp_path / "prompt.txt", "--question", question,
            "--device", "cpu", "--max-new-tokens", 4, "--chunk-batch", 1, "--dist-timeout", 30]


def test_a_rank_that_raises_ends_every_rank_with_its_message(tmp_path):
    code, out, err = torchrun(__file__, "fail", *generate_argv(tmp_path), timeout=60)
    assert code != 0 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == ["error: rank 1 failed: RuntimeError: injected failure on rank 1"], err[-3000:]


def test_bad_input_on_one_rank_is_refused_before_any_work(tmp_path):
    argv = generate_argv(tmp_path)
    code, out, err = torchrun(__file__, "bad-input", *argv, timeout=60)
    assert code != 0 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: rank 1 failed: prompt file {tmp_path}/missing.txt not found"], err[-3000:]
    assert "prefill" not in err


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_a_killed_or_silent_rank_ends_every_rank(tmp_path, mode):
    """Killed: gloo sees the connection drop. Silent (stuck): the collective timeout (3 s here) ends rank 0."""
    argv = [*generate_argv(tmp_path)[:-1], 3]  # --dist-timeout 3
    code, out, err = torchrun(__file__, mode, *argv, timeout=60)  # no hang: all within 60 s
    assert code != 0 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) <= 1 and all(line.startswith("error: lost contact with another rank") for line in lines)


# ----------------------------------------------------------------------------------------------------
# The script torchrun starts

def worker(mode: str, argv: list[str]) -> int:
    import distributed
    if mode == "api":
        from model import load_model
        from tokenizer import load_tokenizer
        group, _ = distributed.setup("cpu", timeout_s=60)
        model, tokenizer = load_model(CKPT), load_tokenizer(CKPT)
        for i, case in enumerate(cases().values()):
            result = run_case(model, tokenizer, case, group)
            if distributed.is_first(group):
                torch.save({"ids": result.ids, "trace": result.trace, "stats": result.stats},
                           os.path.join(argv[0], f"{i}.pt"))
            else:
                assert result is None
        distributed.close(group)
        return 0
    import generate
    if os.environ["RANK"] == "1":
        if mode == "bad-input":
            argv[argv.index("--prompt-file") + 1] = os.path.join(os.path.dirname(argv[argv.index("--prompt-file") + 1]),
                                                                 "missing.txt")
        else:
            def broken(*args, **kwargs):
                if mode == "kill":
                    os.kill(os.getpid(), 9)
                if mode == "hang":
                    time.sleep(600)
                raise RuntimeError("injected failure on rank 1")
            distributed.prefill_chunks = broken
    return generate.main(argv)


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2:]))
