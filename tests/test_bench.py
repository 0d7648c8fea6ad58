"""bench/bench.py keeps working (bench/gpu.sh runs the same code path): a tiny shape end to end, checking that
every method ran, that many chunks per forward give the same kept chunks and logits as one (and that this
comparison really ran), and that a row that raises is recorded without ending the sweep."""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_rows(out):
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_module", os.path.join(ROOT, "bench", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_every_method_with_equal_outputs(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "bench/bench.py", "--shape", "tiny", "--lengths", "512,1024",
                           "--isolate", "no", "--no-plots", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_rows(out)
    assert [(int(r["tokens"]), r["method"]) for r in rows] == [
        (n, m) for n in (512, 1024) for m in ("full", "pc b=1", "pc b=8", "pc b=1 +kv", "pc b=8 +kv")]
    for row in rows:
        assert row["measured"] == "True" and float(row["prefill_s"]) > 0 and float(row["decode_ms_per_token"]) > 0
    by = {(int(r["tokens"]), r["method"]): r for r in rows}
    for n, chunks in ((512, 3), (1024, 5)):  # tiny: 256-token window, chunks of 231 tokens
        assert by[n, "pc b=1"]["chunks_per_forward"] == f"{chunks}x1"
        assert by[n, "pc b=8"]["chunks_per_forward"] == f"1x{chunks}"  # fewer chunks than b: one forward
        for kv in ("", " +kv"):
            many = by[n, "pc b=8" + kv]
            assert many["same_kept_as_b1"] == "True" and many["kept"] == by[n, "pc b=1" + kv]["kept"] != ""
            assert float(many["max_logit_diff_vs_b1"]) <= float(many["logit_tolerance"]) <= 1e-4
            assert many["equal_output"] == "yes"
    assert all(by[n, m]["equal_output"] == "" for n in (512, 1024) for m in ("full", "pc b=1", "pc b=1 +kv"))
    md = (out / "results.md").read_text()
    assert "**Table 7 line**" in md and "SDPA backends allowed, in priority order: flash, efficient, math" in md


def test_a_failing_row_is_recorded_and_the_sweep_goes_on(bench, tmp_path, monkeypatch):
    """cuDNN's "no execution plan" is a RuntimeError, not an out-of-memory error: it must fail its row only.
    Also runs the GPU default warm-up (the same input once untimed before the timed run)."""
    measure, runs = bench.measure, []

    def flaky(model, spec, method, n, path=None):
        runs.append(method)
        if method == "pc b=1 +kv":
            raise RuntimeError("cuDNN Frontend error: No execution plans support the graph.\nmore lines")
        return measure(model, spec, method, n, path)
    monkeypatch.setattr(bench, "measure", flaky)
    warmups = []
    run = bench.prefill_and_decode
    monkeypatch.setattr(bench, "prefill_and_decode", lambda *a: warmups.append(a[2]) or run(*a))
    out = tmp_path / "flaky"
    assert bench.main(["--shape", "tiny", "--lengths", "512", "--isolate", "no", "--no-plots", "--warmup", "same",
                       "--methods", "one,many,one+kv,many+kv", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in read_rows(out)}
    assert rows["pc b=1 +kv"]["measured"] == "False"
    assert rows["pc b=1 +kv"]["note"] == ("failed: RuntimeError: cuDNN Frontend error: No execution plans support "
                                          "the graph.")  # the first line only
    for m in ("pc b=1", "pc b=8", "pc b=8 +kv"):
        assert rows[m]["measured"] == "True" and rows[m]["warmup"] == "same"
    assert warmups == ["pc b=1"] * 2 + ["pc b=8"] * 2 + ["pc b=8 +kv"] * 2  # warm-up, then the timed run
    assert rows["pc b=8"]["equal_output"] == "yes" and rows["pc b=8 +kv"]["equal_output"] == ""  # no b=1 to compare
    md = (out / "results.md").read_text()
    assert "**Failed rows**" in md and "No execution plans" in md
    assert "Traceback" in (out / "log.txt").read_text()


def test_every_row_failing_still_writes_the_report(bench, tmp_path, monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("no kernel")
    monkeypatch.setattr(bench, "measure", broken)
    out = tmp_path / "broken"
    assert bench.main(["--shape", "tiny", "--lengths", "512", "--isolate", "no", "--methods", "full,one",
                       "--out", str(out)]) == 0
    assert [r["note"] for r in read_rows(out)] == ["failed: RuntimeError: no kernel"] * 2
    assert "No row was measured" in (out / "results.md").read_text()
    assert not (out / "prefill_time.png").exists()


def test_chunks_per_forward(bench):
    assert bench.chunks_per_forward(17, 16) == "1x16 + 1x1"
    assert bench.chunks_per_forward(5, 16) == "1x5"
    assert bench.chunks_per_forward(33, 23) == "1x23 + 1x10"
    assert bench.chunks_per_forward(32, 16) == "2x16"
    assert bench.chunks_per_forward(17, 1) == "17x1"
