"""bench/bench.py keeps working (bench/gpu.sh runs the same code path): a tiny shape end to end, checking that
every method ran, that many chunks per forward give the same kept chunks and logits as one (and that this
comparison really ran), in one process and in a fresh process per measurement, and that a row that raises is
recorded without ending the sweep. bench/report.py: the tables it makes from a small hand-written rows file."""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def read_rows(out):
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def bench():
    import bench  # by name, so that a spawned measurement process can import it too
    return bench


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

    def flaky(model, setup, method, n):
        runs.append(method)
        if method == bench.Method(chunk_batch=1, kv_eviction=True):
            raise RuntimeError("cuDNN Frontend error: No execution plans support the graph.\nmore lines")
        return measure(model, setup, method, n)
    monkeypatch.setattr(bench, "measure", flaky)
    warmups = []
    run = bench.prefill_and_decode
    monkeypatch.setattr(bench, "prefill_and_decode", lambda *a: warmups.append(a[2].label) or run(*a))
    out = tmp_path / "flaky"
    assert bench.main(["--shape", "tiny", "--lengths", "512", "--isolate", "no", "--no-plots", "--warmup", "same",
                       "--methods", "one,many,one+kv,many+kv", "--out", str(out)]) == 0
    assert [m.label for m in runs] == ["pc b=1", "pc b=8", "pc b=1 +kv", "pc b=8 +kv"]  # on after the failure
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


def test_a_fresh_process_per_measurement(bench, tmp_path):
    """--isolate yes (the CPU default): each measurement in a spawned process, its rows and logits back here;
    a row that raises there fails only itself (chunk batch 0 is refused by ParallelCompConfig.validate)."""
    out = tmp_path / "isolated"
    assert bench.main(["--shape", "tiny", "--lengths", "512", "--isolate", "yes", "--no-plots", "--threads", "1",
                       "--methods", "one,many", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in read_rows(out)}
    assert rows["pc b=1"]["measured"] == rows["pc b=8"]["measured"] == "True"
    assert rows["pc b=8"]["equal_output"] == "yes" and rows["pc b=8"]["kept"] == rows["pc b=1"]["kept"]
    assert bench.main(["--shape", "tiny", "--lengths", "512", "--isolate", "yes", "--no-plots", "--threads", "1",
                       "--methods", "one,many", "--chunk-batch", "0", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in read_rows(out)}
    assert rows["pc b=1"]["measured"] == "True"
    assert rows["pc b=0"]["note"] == "failed: ConfigError: chunk_batch must be a positive integer, got 0"
    assert "ParallelCompConfig" not in rows["pc b=0"]["note"] and "Traceback" in (out / "log.txt").read_text()


def measured_row(n, method, prefill_s, **extra):
    return {"tokens": n, "method": method, "measured": True, "prefill_s": prefill_s, "decode_ms_per_token": 10.0,
            "peak_mib": 1000.0, "baseline_mib": 500.0, "cache_mib": 24.0, "chunks_per_forward": "", "chunk_size": 2023,
            "prefill_tflop": 1.0, "achieved_gflops": 100.0, "of_matmul": 0.5, **extra}


def test_report_from_a_rows_file(tmp_path):
    """report.py alone, on a results.json written by hand: the tables, the many-vs-one comparison, the Table 7
    line, an extrapolated full-attention time, a failed row, and the GPU-only 80 GB table."""
    import report
    pc = {"chunks_per_forward": "1x8"}
    equal = {"equal_output": "yes", "max_logit_diff_vs_b1": 0.0, "logit_tolerance": 1e-5, "max_score_diff_vs_b1": 0.0,
             "score_gap_at_keep": 0.1}
    rows = [measured_row(16384, "full", 20.0), measured_row(16384, "pc b=1", 8.0, chunks_per_forward="8x1"),
            measured_row(16384, "pc b=8 +kv", 4.0, **pc, **equal),
            {"tokens": 16384, "method": "pc b=1 +kv", "measured": False, "note": "failed: out of memory"},
            {"tokens": 32768, "method": "full", "measured": False, "prefill_s": 80.0, "extrapolated": True,
             "note": "skipped: above --full-max 16384"},
            measured_row(32768, "pc b=1", 16.0, chunks_per_forward="16x1"),
            measured_row(32768, "pc b=1 +kv", 12.0, chunks_per_forward="16x1"),
            measured_row(32768, "pc b=8 +kv", 8.0, peak_mib=1500.0, **pc, **equal)]
    methods = [{"chunk_batch": None, "kv_eviction": False}, {"chunk_batch": 1, "kv_eviction": False},
               {"chunk_batch": 1, "kv_eviction": True}, {"chunk_batch": 8, "kv_eviction": True}]
    run = {"title": "20m, float32, cpu", "machine": ["torch 2.x"], "keep_chunks": 3, "question_tokens": 16,
           "logit_tolerance": 1e-5, "methods": methods, "rows": rows,
           "setup": {"device": "cpu", "dtype": "float32", "threads": 2, "decode_tokens": 8, "warmup": "small"}}
    (tmp_path / "results.json").write_text(json.dumps(run))
    md, files = report.write(str(tmp_path), with_plots=False)
    assert files == [] and (tmp_path / "results.md").read_text() == md
    assert "| tokens | full | pc b=1 | pc b=1 +kv | pc b=8 +kv |" in md
    assert "| 16K | 20.00 | 8.00 (2.5x) | failed | 4.00 (5.0x) |" in md
    assert "| 32K | 80.00* | 16.00 (5.0x*) | 12.00 (6.7x*) | 8.00 (10.0x*) |" in md
    assert "| 16K | 8x1 | - | 1x8 |" in md  # chunks per forward: ParallelComp columns only
    assert "| 16K | - | - | - | - |" in md  # no pc b=8 without eviction, no pc b=1 +kv at 16K
    assert "| 32K | - | - | 1.50x | yes: 0.0e+00 (1.0e-05); 0.0e+00 (1.0e-01) |" in md
    assert "16K: 8.00 s vs 4.00 s (1x8 chunks), 2.00x; 32K: 16.00 s vs 8.00 s (1x8 chunks), 2.00x." in md
    assert "pc b=8 +kv 1.50x (above baseline: 2.00x)" in md  # peak memory 32K over 16K
    assert "**Failed rows** (the traceback is in log.txt): 16K pc b=1 +kv: failed: out of memory." in md
    assert "Notes: skipped: above --full-max 16384." in md and "Fits in 80 GB" not in md
    run["setup"]["device"] = "cuda"
    (tmp_path / "results.json").write_text(json.dumps(run))
    assert "| 16K | yes (1.0 / 1.0 GiB) | yes (1.0 / 1.0 GiB) | - | yes (1.0 / 1.0 GiB) |" in report.write(
        str(tmp_path), with_plots=False)[0]
