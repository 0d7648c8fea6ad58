"""Passkey accuracy of ParallelComp and of plain full attention at multiples of the demo model's training window.

For each length (1x, 4x, 16x, 64x, 256x the window by default) it builds `--n` passkey examples with the
needle at evenly spread depths (demo/passkey.py, seeded) and answers each with both methods of
parallelcomp.answer: "parallelcomp" (chunks at reused positions, keep_chunks=1, the paper's setting for
retrieval) and "full" (one ordinary forward over all tokens; past the window it runs at positions the model
never saw in training). An answer is right when the generated text is exactly the key's digits.

Full attention is quadratic in the input length and slow on a CPU: above --full-limit tokens it runs on only
the first --full-n-long examples of a length (0 skips it); the table says how many it ran.

    .venv/bin/python demo/evaluate.py                      # the default table, several minutes on 2 cores
    .venv/bin/python demo/evaluate.py --n 5 --lengths 1,4  # a quick look
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on a shared CPU

import argparse
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from demo.passkey import make_example  # noqa: E402
from model import load_model  # noqa: E402
import parallelcomp as pc  # noqa: E402
from cli_io import parse_calibration  # noqa: E402
from parallelcomp import ParallelCompConfig  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

MAX_NEW_TOKENS = 8  # the answer is a space marker, 5 digits, then EOS


def needle_kept(result, answer: str, tok) -> bool:
    """Whether one of the chunks ParallelComp kept holds the key (read from the result's trace)."""
    ids, bounds = result.trace["context_ids"], result.trace["chunk_bounds"]
    return any(answer in tok.decode(ids[int(bounds[c, 0]):int(bounds[c, 1])].tolist())
               for c in result.trace["kept_chunks"])


def evaluate_length(model, tok, n_tokens: int, n: int, n_full: int, cfg: ParallelCompConfig, seed: int) -> dict:
    """Both methods on n examples of n_tokens tokens (full attention on the first n_full of them)."""
    rng = random.Random(seed * 1_000_003 + n_tokens)
    row = {"pc": 0, "kept": 0, "full": 0, "n_full": n_full, "pc_s": 0.0, "full_s": 0.0}
    for i in range(n):
        context, question, answer = make_example(rng, tok, n_tokens, depth=i / max(1, n - 1))
        t = time.perf_counter()
        res = pc.answer(model, tok, context, question, cfg, method="parallelcomp", max_new_tokens=MAX_NEW_TOKENS,
                       trace=True)
        row["pc_s"] += time.perf_counter() - t
        row["pc"] += res.text.strip() == answer
        row["kept"] += needle_kept(res, answer, tok)
        if i < n_full:
            t = time.perf_counter()
            res = pc.answer(model, tok, context, question, cfg, method="full", max_new_tokens=MAX_NEW_TOKENS)
            row["full_s"] += time.perf_counter() - t
            row["full"] += res.text.strip() == answer
    return row


def main(model_dir: str, multiples: list[int], n: int, full_limit: int, full_n_long: int, keep_chunks: int,
         seed: int, threads: int, kv_capacity: int | None = None, calibration: str = "none") -> list[dict]:
    torch.set_num_threads(threads)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    window = model.args.trained_window
    cfg = ParallelCompConfig(keep_chunks=keep_chunks, kv_capacity=kv_capacity,
                             calibration=parse_calibration(calibration, model.args.n_layers))
    print(f"model {model_dir}: training window {window} tokens; {n} examples per length, needle depths evenly "
          f"spread 0..1; ParallelComp keep_chunks={keep_chunks}, kv_capacity={kv_capacity}, "
          f"calibration={calibration}, default chunk size; greedy, "
          f"{MAX_NEW_TOKENS} new tokens at most\n", flush=True)
    lines = ["| length | ParallelComp | needle chunk kept | full attention | s/example (PC) | s/example (full) |",
             "|---:|---:|---:|---:|---:|---:|"]
    rows = []
    for m in multiples:
        n_tokens = m * window
        n_full = n if n_tokens <= full_limit else min(n, full_n_long)
        row = evaluate_length(model, tok, n_tokens, n, n_full, cfg, seed)
        rows.append({"multiple": m, "tokens": n_tokens, "n": n, **row})
        full = f"{row['full'] / n_full:.0%} ({row['full']}/{n_full})" if n_full else "skipped"
        full_s = f"{row['full_s'] / n_full:.2f}" if n_full else "-"
        lines.append(f"| {m}x = {n_tokens:,} | {row['pc'] / n:.0%} ({row['pc']}/{n}) | {row['kept']}/{n} | {full} "
                     f"| {row['pc_s'] / n:.2f} | {full_s} |")
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))
    if any(r["n_full"] < r["n"] for r in rows):
        print(f"\nFull attention ran on at most {full_n_long} example(s) per length above {full_limit:,} tokens "
              "(quadratic cost on CPU); its accuracy there is from that small sample.")
    print(f"Full attention beyond {window} tokens uses positions the model never saw in training.")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=os.path.join(ROOT, "demo", "model"), help="checkpoint folder")
    p.add_argument("--lengths", default="1,4,16,64,256",
                   help="comma-separated input lengths, as multiples of the model's training window")
    p.add_argument("--n", type=int, default=20, help="examples per length")
    p.add_argument("--full-limit", type=int, default=4096,
                   help="above this many tokens, full attention runs on --full-n-long examples only")
    p.add_argument("--full-n-long", type=int, default=2,
                   help="examples per length for full attention above --full-limit (0 skips it)")
    p.add_argument("--keep-chunks", type=int, default=1, help="chunks ParallelComp keeps (k)")
    p.add_argument("--kv-capacity", type=int, help="context tokens ParallelComp keeps per chunk (default: all)")
    p.add_argument("--calibration", default="none", help="none, paper, or rules like middle:1-1,sink:4-4")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    a = p.parse_args()
    main(a.model, [int(x) for x in a.lengths.split(",")], a.n, a.full_limit, a.full_n_long, a.keep_chunks, a.seed,
         a.threads, a.kv_capacity, a.calibration)
