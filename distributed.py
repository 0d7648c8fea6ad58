"""ParallelComp's chunk prefill spread over processes, GPUs and hosts with torch.distributed (SPEC.md,
"Distributed prefill"). Launch with torchrun: NCCL and cuda:LOCAL_RANK on GPUs, gloo on CPU.

Until the top-k, chunks are independent, so N ranks split them and never talk about activations:

  1. every rank tokenizes and cuts the input exactly as one process would, then encodes its contiguous block of
     the chunks with parallelcomp.prefill_chunks (batched, KV eviction per chunk) and keeps its local top-k;
  2. after each chunk batch, every rank reports (chunks done, or the error that stopped it) in one small
     all_gather: rank 0 shows progress over all ranks, and one rank's failure ends every rank at its next batch;
  3. the ranks agree on the global top-k from the (score, index) pairs, with ChunkQueue's rule;
  4. the owners of the k kept chunks send their kept K/V and indices to rank 0 (tensors, point to point), which
     assembles the cache, runs the question and decodes (the rest of parallelcomp.run_parallelcomp).

Contiguous blocks, not chunks r, r+N, ...: split_chunks makes chunks of near-equal length, so blocks balance as
well as interleaving would, and each rank's batches are runs of neighbouring chunks, as in one process.
This file is the only one that imports torch.distributed; parallelcomp.py stays the paper's pipeline.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import json
import os
import time
import zlib

import torch
import torch.distributed as dist

from parallelcomp import ChunkQueue, EncodedChunk, prefill_chunks


class RankFailed(RuntimeError):
    """Another rank of the group failed; the message names it and its error. bad_input: that error was an input
    or option error (a ValueError: ConfigError, CheckpointError, ...), not a crash or out of memory."""

    def __init__(self, message: str, bad_input: bool):
        super().__init__(message)
        self.bad_input, self.agreed = bad_input, True  # raised where every rank learns of the failure


def launched() -> bool:
    """True in a process started by torchrun (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_type: str, timeout_s: float = 600.0) -> tuple[dist.ProcessGroup, torch.device]:
    """Join the process group torchrun describes in the environment: NCCL on cuda:LOCAL_RANK, or gloo on CPU.
    Every collective fails after timeout_s instead of hanging when a rank has died. Returns (group, device)."""
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # the reports (all_gather_json) go through the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.group.WORLD, device


def close(group: dist.ProcessGroup | None = None) -> None:
    """Leave the process group, if this process joined one. With `group`, first wait for every rank of it to get
    here: rank 0 may still be decoding, and a rank that tears down gloo early was seen to abort."""
    if group is not None:
        agree(group)
    if dist.is_initialized():
        dist.destroy_process_group()


def is_first(group: dist.ProcessGroup | None) -> bool:
    """True on the rank that decodes and writes (rank 0), and in a single process."""
    return group is None or dist.get_rank(group) == 0


def agree(group: dist.ProcessGroup, error: Exception | None = None, report=None) -> list:
    """Every rank's `report`, in rank order (a collective: every rank calls it). If any rank passes an error,
    every rank raises: that rank its own error, the others RankFailed naming the first rank that failed."""
    try:
        reports = all_gather_json(group, [describe(error), report])
    except RuntimeError as e:  # gloo: connection reset; NCCL: DistBackendError; both: the timeout
        raise RankFailed("lost contact with another rank: it died, or did not answer within the timeout "
                         f"(--dist-timeout) [{str(e).splitlines()[0][:300]}]", bad_input=False) from e
    if error is not None:
        error.agreed = True  # every rank knows now: `together` does not report it again
        raise error
    for rank, (failed, _) in enumerate(reports):
        if failed is not None:
            raise RankFailed(f"rank {rank} failed: {failed[0]}", failed[1])
    return [r for _, r in reports]


def all_gather_json(group: dist.ProcessGroup, obj) -> list:
    """Every rank's `obj`, in rank order, sent as JSON in a byte tensor (no pickles cross ranks; tuples arrive as
    lists). On the group's device: CUDA for NCCL, CPU for gloo."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([len(data)], device=device), group=group)
    longest = max(int(n) for n in sizes)
    out = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(out, torch.cat([data, data.new_zeros(longest - len(data))]), group=group)
    return [json.loads(bytes(o[:int(n)].tolist())) for o, n in zip(out, sizes)]


def describe(error: Exception | None) -> tuple[str, bool] | None:
    """(the line rank 0 prints, whether it is bad input), or None."""
    if error is None:
        return None
    if isinstance(error, ValueError):  # UsageError, ConfigError, CheckpointError: the message is the whole story
        return " ".join(str(error).splitlines()), True
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}", False


@contextlib.contextmanager
def together(group: dist.ProcessGroup | None):
    """Run a block on every rank; at its end every rank knows whether all got through (see agree), so no rank
    goes on to a collective that a failed one would never join. A no-op without a group."""
    try:
        yield
    except Exception as e:
        if group is not None and not getattr(e, "agreed", False):
            agree(group, e)
        raise
    if group is not None:
        agree(group)


def blocks(n_chunks: int, world: int) -> list[range]:
    """Rank r encodes chunks r*C//N .. (r+1)*C//N - 1 (empty for some ranks when C < N)."""
    return [range(r * n_chunks // world, (r + 1) * n_chunks // world) for r in range(world)]


@torch.inference_mode()
def prefill_chunks_distributed(model, header: torch.Tensor, context: torch.Tensor, question: torch.Tensor,
                               bounds: list[tuple[int, int]], cfg, progress, group: dist.ProcessGroup):
    """parallelcomp.prefill_chunks over the ranks of `group` (steps 1-4 of the module docstring); every rank calls
    it with the same arguments. On rank 0 returns (kept chunks in document order, all scores [C] float32 in
    document order, info: chunk_rank [C] int64, rank_prefill_s [N], kv_bytes_moved, report_bytes); on the other
    ranks None, after sending their kept chunks. progress(done, total) is called on rank 0 with all ranks' chunks."""
    rank, world, device = dist.get_rank(group), dist.get_world_size(group), context.device
    inputs = torch.cat([header, context, question]).cpu().numpy().tobytes() + repr(bounds).encode()
    if len(set(agree(group, report=zlib.crc32(inputs)))) > 1:  # all ranks see the same reports: all raise
        raise RankFailed("the ranks read different inputs; every rank needs the same prompt, question, options "
                         "and checkpoint", bad_input=True)
    share = blocks(len(bounds), world)
    steps = max(math.ceil(len(s) / cfg.chunk_batch) for s in share)  # the same on every rank: one report each
    queue, scores, report_bytes, t0 = ChunkQueue(cfg.keep_chunks), [], 0, time.perf_counter()
    for step in range(steps):
        batch, error = share[rank][step * cfg.chunk_batch:(step + 1) * cfg.chunk_batch], None
        try:
            if batch:
                kept, batch_scores = prefill_chunks(model, header, context, question, bounds[batch.start:batch.stop],
                                                    cfg, first_index=batch.start)
                for chunk in kept:
                    queue.push(chunk)
                scores += batch_scores.tolist()
        except Exception as e:  # out of memory, or anything else: every rank stops after this batch
            error = e
        done = agree(group, error, report=len(scores))
        report_bytes += len(json.dumps(done))
        if progress is not None and rank == 0:
            progress(sum(done), len(bounds))
    local = queue.kept()
    reports = agree(group, report=([(c.score, c.index) for c in local], scores, time.perf_counter() - t0))
    report_bytes += sum(len(json.dumps(r)) for r in reports)
    pairs = sorted(pair for local_pairs, _, _ in reports for pair in local_pairs)  # (I_c, index): ChunkQueue's rule
    best = pairs[:cfg.keep_chunks]
    keep, owner = sorted(index for _, index in best), torch.zeros(len(bounds), dtype=torch.long)
    for r, s in enumerate(share):
        owner[s.start:s.stop] = r
    mine = {c.index: c for c in local if c.index in keep}  # the rest of the local top-k is freed here
    del queue, local
    kept, moved, error = None, 0, None
    all_scores = [x for _, rank_scores, _ in reports for x in rank_scores]  # rank order = document order
    try:  # both ends walk the kept chunks in document order, so sends and receives pair up
        for i in keep:
            if rank != 0 and i in mine:  # (K, V) of every layer in one tensor, the indices in another
                c = mine[i]
                dist.send(torch.stack([torch.stack(c.keys), torch.stack(c.values)]), group_dst=0, group=group)
                dist.send(torch.stack(c.kept), group_dst=0, group=group)
            elif rank == 0 and i not in mine:
                kv, idx = receive(model, bounds[i], len(header), cfg.kv_capacity, int(owner[i]), group, device)
                moved += kv.numel() * kv.element_size() + idx.numel() * idx.element_size()
                mine[i] = EncodedChunk(i, *bounds[i], all_scores[i], list(kv[0]), list(kv[1]), list(idx))
        kept = [mine[i] for i in keep] if rank == 0 else None
    except Exception as e:
        error = e
    agree(group, error)  # no rank exits while another still sends or receives
    if rank != 0:
        return None
    info = {"chunk_rank": owner, "rank_prefill_s": [t for _, _, t in reports], "kv_bytes_moved": moved,
            "report_bytes": report_bytes}
    return kept, torch.tensor(all_scores, dtype=torch.float32), info


def receive(model, bound: tuple[int, int], n_header: int, kv_capacity: int | None, src: int, group, device):
    """One kept chunk's K/V [2, L, Hkv, S, hd] and indices [L, Hkv, S] from rank `src`. Rank 0 knows S without
    asking: the header plus snapkv_keep's min(kv_capacity, context tokens)."""
    args, n_ctx = model.args, bound[1] - bound[0]
    s = n_header + min(n_ctx, kv_capacity or n_ctx)
    kv = torch.empty(2, args.n_layers, args.n_kv_heads, s, args.head_dim, dtype=next(model.parameters()).dtype,
                     device=device)
    idx = torch.empty(args.n_layers, args.n_kv_heads, s, dtype=torch.long, device=device)
    dist.recv(kv, group_src=src, group=group)
    dist.recv(idx, group_src=src, group=group)
    return kv, idx
