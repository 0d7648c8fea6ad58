"""Chunk prefill in one process against N processes (torch.distributed, gloo), and a model of N GPUs.

    python bench/ranks.py --shape 20m --tokens 32768 --ranks 2 --out bench/results/distributed-cpu

The same input (a Llama shape with random weights, random token ids, chunks of the trained window, k = 3
kept, KV eviction to half a chunk, 1 chunk per forward) runs in one plain process, then under torchrun with
N ranks; every process gets one thread (OMP_NUM_THREADS=1), so N ranks use N cores. Each run also decodes 8
tokens, and the script checks that both keep the same chunks and generate the same tokens. It reports the
prefill seconds (stages 1-6: chunk prefill, exchange, question), each rank's chunk-prefill seconds, the
bytes that moved (kept chunks' K/V and indices to rank 0, and the per-batch reports), and then a model of N
GPUs from the measured per-chunk time t_c and the measured bytes B of one kept, compressed chunk:

    T(N) = ceil(C / N) * t_c + k * B / bandwidth + t_q        (t_q: the question's prefill, measured)

Writes results.md and results.json into --out. Measure on an otherwise idle machine (say so if not).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402

DECODE_TOKENS, KEEP = 8, 3


def run(model, header, context, question, cfg, strength, progress, group):
    """run_parallelcomp with its chunk prefill spread over `group`'s ranks (as distributed.answer composes it):
    (cache, logits, next_pos, info) on rank 0 or in a single process, None on the other ranks."""
    import distributed
    from parallelcomp import read_question, run_parallelcomp, split_chunks
    if group is None:
        return run_parallelcomp(model, header, context, question, cfg, strength, progress)
    bounds = split_chunks(strength, cfg.chunk_size)
    out = distributed.prefill_chunks_distributed(model, header, context, question, bounds, cfg, progress, group)
    if out is None:
        return None
    kept, scores, ranks = out
    cache, logits, next_pos = read_question(model, kept, len(header), question, cfg)
    return cache, logits, next_pos, {"bounds": bounds, "scores": scores, "kept": [c.index for c in kept], **ranks}


def worker(spec: dict) -> None:
    """One process (or one rank under torchrun): warm up, time run_parallelcomp, decode on rank 0, write JSON."""
    import distributed
    from bench import QUESTION_TOKENS, SHAPES, make_inputs, random_model
    from model import ModelArgs
    from parallelcomp import ParallelCompConfig, decode, default_chunk_size
    torch.set_num_threads(1)
    group = distributed.setup("cpu")[0] if distributed.launched() else None
    args = ModelArgs(**SHAPES[spec["shape"]])
    model = random_model(args, torch.device("cpu"), torch.float32, seed=0)  # the same weights on every rank
    chunk = default_chunk_size(args, 1, QUESTION_TOKENS, DECODE_TOKENS)
    cfg = ParallelCompConfig(chunk_size=chunk, keep_chunks=KEEP, kv_capacity=chunk // 2, chunk_batch=1)
    warm = make_inputs(args, 2 * chunk, torch.device("cpu"), seed=1)
    run(model, *warm[:3], cfg, warm[3], None, group)  # first-call costs, on every rank
    header, context, question, strength = make_inputs(args, spec["tokens"], torch.device("cpu"), seed=0)
    marks = []  # rank 0: when the chunk batches of all ranks were done
    t0 = time.perf_counter()
    progress = lambda *_: marks.append(time.perf_counter())  # noqa: E731
    out = run(model, header, context, question, cfg, strength, progress, group)
    prefill_s = time.perf_counter() - t0
    sync_s = 0.0
    if group is not None:  # t_s: one per-batch report (all_gather_json of a few bytes), alone
        t1 = time.perf_counter()
        for _ in range(20):
            distributed.agree(group, report=0)
        sync_s = (time.perf_counter() - t1) / 20
    if out is not None:  # rank 0, or the single process
        cache, logits, next_pos, info = out
        ids = decode(model, cache, logits, next_pos, DECODE_TOKENS, stop_ids=set())
        kept_tokens = 1 + cfg.kv_capacity  # BOS + the evicted chunk, per layer and KV head
        chunk_bytes = args.n_layers * args.n_kv_heads * kept_tokens * (2 * args.head_dim * 4 + 8)  # K, V fp32; idx
        result = {"prefill_s": prefill_s, "chunks_s": marks[-1] - t0, "sync_s": sync_s, "ids": ids,
                  "kept": info["kept"], "scores": info["scores"].tolist(), "chunks": len(info["bounds"]),
                  "chunk_size": chunk, "chunk_bytes": chunk_bytes,
                  **{k: info[k] for k in ("rank_prefill_s", "kv_bytes_moved", "report_bytes") if k in info}}
        with open(spec["result"], "w") as f:
            json.dump(result, f)
    distributed.close(group)


def launch(spec: dict, ranks: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    subprocess.run([sys.executable, *launcher, __file__, "--worker", json.dumps(spec)], env=env, check=True)
    with open(spec["result"]) as f:
        return json.load(f)


def report(one: dict, many: dict, ranks: int, spec: dict) -> str:
    c, k, steps = one["chunks"], KEEP, math.ceil(one["chunks"] / ranks)
    chunk_s = one["chunks_s"] / c  # t_c: one chunk's prefill, from the single process
    question_s = one["prefill_s"] - one["chunks_s"]  # t_q: assemble + the question (+ calibration: none here)
    sync_s, rank_chunk_s = many["sync_s"], max(many["rank_prefill_s"]) / steps
    same = one["ids"] == many["ids"] and one["kept"] == many["kept"]
    diff = max(abs(a - b) for a, b in zip(one["scores"], many["scores"]))
    lines = [f"# Distributed chunk prefill: 1 process against {ranks} (gloo, 1 thread each)", "",
             f"Shape {spec['shape']} (random weights, float32), {spec['tokens']:,} tokens: {c} chunks of "
             f"{one['chunk_size']} tokens, k = {k} kept, KV eviction to {one['chunk_size'] // 2} tokens, 1 chunk "
             f"per forward, {DECODE_TOKENS} tokens decoded.", "",
             "| processes | prefill, stages 1-6 (s) | speedup | chunk prefill (s) | per rank (s) | after it: exchange "
             "+ question (s) | K/V moved to rank 0 | reports |",
             "|---:|---:|---:|---:|---|---:|---:|---:|",
             f"| 1 | {one['prefill_s']:.2f} | 1.00x | {one['chunks_s']:.2f} | - | {question_s:.3f} | - | - |",
             f"| {ranks} | {many['prefill_s']:.2f} | {one['prefill_s'] / many['prefill_s']:.2f}x | "
             f"{many['chunks_s']:.2f} | " + ", ".join(f"{t:.2f}" for t in many["rank_prefill_s"])
             + f" | {many['prefill_s'] - many['chunks_s']:.3f} | {many['kv_bytes_moved'] / 2**20:.2f} MiB | "
             f"{many['report_bytes']:,} B |", "",
             f"Same output: {'yes' if same else 'NO'} (kept chunks {one['kept']} / {many['kept']}, generated "
             f"tokens {'equal' if one['ids'] == many['ids'] else 'different'}; largest chunk-score difference "
             f"{diff:.1e}). One chunk took {chunk_s:.3f} s in the single process and {rank_chunk_s:.3f} s on the "
             f"busiest of the {ranks} ranks: the difference is the ranks competing for the machine's cores and "
             f"memory bandwidth (one per-batch report alone takes {1e3 * sync_s:.2f} ms).", "",
             "## A model of N GPUs", "",
             f"T(N) = ceil(C / N) * (t_c + t_s) + k * B / bandwidth + t_q, measured here: t_c = {chunk_s:.3f} s per "
             f"chunk (single process), t_s = {1e3 * sync_s:.2f} ms per batch for the report all_gather (gloo, measured "
             f"alone), t_q = {question_s:.3f} s, B = {one['chunk_bytes'] / 2**20:.2f} MiB per kept chunk (K/V and "
             f"indices, float32); C = {c}, k = {k}. It assumes each rank runs as fast as one process alone (one GPU "
             "per rank); scale t_c and t_q to a GPU's speed. The exchange is k * B whatever the input length.", "",
             "| N | chunks per rank | chunk prefill (s) | exchange at 25 GB/s (ms) | T(N) (s) | speedup |",
             "|---:|---:|---:|---:|---:|---:|"]
    t1 = c * chunk_s + question_s
    for n in (1, 2, 4, 8, 16, 32, 64):
        per_rank = math.ceil(c / n)
        exchange = 0.0 if n == 1 else k * one["chunk_bytes"] / 25e9
        chunks = per_rank * (chunk_s + (sync_s if n > 1 else 0.0))
        t = chunks + exchange + question_s
        lines.append(f"| {n} | {per_rank} | {chunks:.2f} | {1e3 * exchange:.2f} | {t:.2f} | {t1 / t:.1f}x |")
    lines += ["", "Speedup stops at N = C (one chunk per rank) and is bounded by t_q, the question's prefill, "
              "which rank 0 runs alone."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="20m", help="a bench.py shape (default 20m)")
    p.add_argument("--tokens", type=int, default=32768, help="input tokens (default 32768)")
    p.add_argument("--ranks", type=int, default=2, help="processes of the distributed run (default 2)")
    p.add_argument("--out", default="bench/results/distributed-cpu", help="folder for results.md and results.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(json.loads(a.worker))
        return 0
    os.makedirs(a.out, exist_ok=True)
    spec = {"shape": a.shape, "tokens": a.tokens}
    load = os.getloadavg()[0]
    one = launch(dict(spec, result=os.path.join(a.out, "one.json")), 1)
    many = launch(dict(spec, result=os.path.join(a.out, f"ranks{a.ranks}.json")), a.ranks)
    text = report(one, many, a.ranks, spec) + (f"\nMachine: {os.cpu_count()} cores, 1-minute load average "
                                               f"{load:.1f} before and {os.getloadavg()[0]:.1f} after the runs.\n")
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
