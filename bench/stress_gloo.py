"""The gloo teardown stress run (issue 18): many two-rank CLI launches with a CPU hog beside them.

    python bench/stress_gloo.py                  # 30 launches, about 10 minutes on 2 busy cores

Each launch is `torchrun --standalone --nproc-per-node 2 generate.py` on the demo model (demo/model) and a
2,000-token passkey prompt (9 chunks), one thread per rank, 4 new tokens. Beside them runs one busy-loop process
that this script starts and kills; it also stops by itself after --hog-max-s, should this script be killed.
A launch fails when it exits non-zero, prints "terminate called without an active exception" (the abort a gloo
thread alive at interpreter exit caused, about 1 launch in 8 before the fix), or does not end in --timeout-s.
Prints one line per failure and the total; exits 1 if any launch failed.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CKPT = os.path.join(ROOT, "demo", "model")
TEARDOWN_ABORT = "terminate called without an active exception"


def start_hog(max_s: float) -> subprocess.Popen:
    """One process that keeps a core busy for at most max_s seconds."""
    loop = f"import time\nend = time.monotonic() + {max_s}\nwhile time.monotonic() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", loop])


def launch(prompt_file: str, question: str, timeout_s: float) -> str | None:
    """One two-rank launch; None when it went well, else what went wrong."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "generate.py",
           "--ckpt", CKPT, "--prompt-file", prompt_file, "--question", question, "--device", "cpu",
           "--max-new-tokens", "4", "--chunk-batch", "1"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"no end within {timeout_s:g} s"
    err = proc.stderr.decode(errors="replace")
    if TEARDOWN_ABORT in err:
        return f"teardown abort (exit {proc.returncode})"
    if proc.returncode != 0 or not proc.stdout.strip():
        last = [line for line in err.splitlines() if line.strip()][-1:] or [""]
        return f"exit {proc.returncode}: {last[0][:200]}"
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launches", type=int, default=30, help="two-rank launches (default 30)")
    p.add_argument("--timeout-s", type=float, default=120, help="seconds one launch may take (default 120)")
    p.add_argument("--hog-max-s", type=float, default=1800, help="the hog stops by itself after this (default 1800)")
    args = p.parse_args()
    from demo.passkey import make_example
    from tokenizer import load_tokenizer
    context, question, _ = make_example(random.Random(0), load_tokenizer(CKPT), 2000, 0.37)
    failures, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = os.path.join(tmp, "prompt.txt")
        with open(prompt_file, "w", encoding="utf-8") as f:
            f.write(context)
        hog = start_hog(args.hog_max_s)
        try:
            for i in range(args.launches):
                problem = launch(prompt_file, question, args.timeout_s)
                if problem is not None:
                    failures.append(i)
                    print(f"launch {i + 1}: {problem}", flush=True)
        finally:
            hog.kill()
            hog.wait()
    print(f"{len(failures)} / {args.launches} launches failed, {time.perf_counter() - t0:.0f} s, with a CPU hog "
          f"beside them ({os.cpu_count()} cores)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
