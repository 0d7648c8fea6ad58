"""bench/bench.py keeps working (its GPU script runs the same code path): a tiny shape end to end, checking
that every method ran and that many chunks per forward give the same kept chunks and logits as one."""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_every_method_with_equal_outputs(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "bench/bench.py", "--shape", "tiny", "--lengths", "512,1024",
                           "--isolate", "no", "--no-plots", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    methods = {row["method"] for row in rows}
    assert {"full", "pc b=1", "pc b=1 +kv"} <= methods and len(methods) >= 5
    for row in rows:
        assert float(row["prefill_s"]) > 0 and float(row["decode_ms_per_token"]) > 0
        if row["same_kept_as_b1"]:
            assert row["same_kept_as_b1"] == "True" and float(row["max_logit_diff_vs_b1"]) < 1e-4
    assert (out / "results.md").exists()
