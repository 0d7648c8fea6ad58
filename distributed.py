"""ParallelComp's chunk prefill spread over processes, GPUs and hosts with torch.distributed (SPEC.md,
"Distributed prefill"). Launch with torchrun: NCCL and cuda:LOCAL_RANK on GPUs, gloo on CPU.

Until the top-k, chunks are independent, so N ranks split them and never talk about activations:

  1. every rank tokenizes and cuts the input exactly as one process would, and the ranks check that they read
     the same input, options, checkpoint config and dtype; then each encodes its contiguous block of the chunks
     with parallelcomp.prefill_chunks (batched, KV eviction per chunk) and keeps its local top-k;
  2. after each chunk batch, every rank reports (chunks done, or the error that stopped it) in one small
     all_gather: rank 0 shows progress over all ranks, and one rank's failure ends every rank at its next batch;
  3. the ranks agree on the global top-k from the (score, index) pairs, with ChunkQueue's rule (keep_order);
  4. the owners of the k kept chunks send their kept K/V and indices to rank 0 (tensors, point to point), which
     assembles the cache, runs the question and decodes (parallelcomp's stages 4-7);
  5. the other ranks wait for rank 0's decode without a timeout: it may take longer than --dist-timeout, and
     the wait still ends at once when rank 0's process dies (its connections close).

Contiguous blocks, not chunks r, r+N, ...: split_chunks makes chunks of near-equal length, so blocks balance as
well as interleaving would, and each rank's batches are runs of neighbouring chunks, as in one process.
This file is the only one that imports torch.distributed; parallelcomp.py stays the paper's pipeline.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import json
import os
import time
import zlib

import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose: its functions take `group=group.WORLD` as a default
# argument, evaluated at import. Imported later (torch._dynamo imports it, and load_model's meta-device build
# imports torch._dynamo), it would hold the default group forever: destroy_process_group would free nothing,
# gloo's threads would still run at interpreter exit, and about 1 launch in 8 on a busy machine ended in
# "terminate called without an active exception" after the answer was written.
import torch.distributed.nn.functional  # noqa: F401

from parallelcomp import (ChunkQueue, EncodedChunk, answer as answer_one, elapsed, finish, keep_order,
                          kept_length, prefill_chunks, prepare, read_question, split_chunks)

# The wait for rank 0's decode (step 5) goes through a second gloo group whose timeout no decode reaches.
PATIENT = datetime.timedelta(days=30)
_patient: dict = {}  # process group -> its patient twin (setup)


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
    Every collective fails after timeout_s instead of hanging when a rank has died, except the wait for rank 0's
    decode (wait_for_first). Returns (group, device)."""
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # the reports (all_gather_json) go through the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    group = dist.group.WORLD
    _patient[group] = dist.new_group(backend="gloo", timeout=PATIENT)  # gloo on GPUs too: NCCL's watchdog would
    return group, device                                              # abort a collective that waits that long


def start(args) -> tuple[dist.ProcessGroup | None, torch.device | None]:
    """generate.py's (group, rank device) under torchrun; (None, None) in a single process."""
    if not launched():
        return None, None
    return setup("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu", args.dist_timeout)


def close(group: dist.ProcessGroup | None = None) -> None:
    """Leave the process group (and its patient twin), if this process joined one. With `group`, first wait for
    every rank of it to get here, without a timeout (rank 0 may still be writing its answer).
    A group's gloo threads end when the group object is freed, so close when no other reference to it is left
    (generate.main closes after run() has returned): threads alive at interpreter exit can abort the process."""
    if group is not None:
        agree(patient(group))
    _patient.clear()  # this file's references go first, so destroy_process_group frees the groups
    if dist.is_initialized():
        dist.destroy_process_group()


def is_first(group: dist.ProcessGroup | None) -> bool:
    """True on the rank that decodes and writes (rank 0), and in a single process."""
    return group is None or dist.get_rank(group) == 0


def patient(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """`group`'s twin for waits that no timeout bounds (made by setup)."""
    if group not in _patient:
        raise RuntimeError("this process group was not joined with distributed.setup(), which also makes the "
                           "group that waits for rank 0's decode")
    return _patient[group]


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


def wait_for_first(group: dist.ProcessGroup, error: Exception | None = None) -> None:
    """agree over the patient twin: rank 0 calls it when it has decoded (with its error, if any), the other ranks
    wait there for it however long that takes. A rank 0 that dies ends the wait at once."""
    agree(patient(group), error)


# ----------------------------------------------------------------------------------------------------
# The chunk prefill over ranks

def fingerprint(model, header: torch.Tensor, context: torch.Tensor, question: torch.Tensor,
                bounds: list[tuple[int, int]], cfg) -> dict:
    """What every rank must share, by name: checksums of the token ids and chunk bounds, every option, the
    checkpoint's config and the weights' dtype."""
    ids = torch.cat([header, context, question]).cpu().numpy().tobytes()
    out = {"token ids": zlib.crc32(ids), "chunk bounds": zlib.crc32(repr(bounds).encode())}
    out.update({f.name: repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)})
    out.update({f"config.json {f.name}": repr(getattr(model.args, f.name)) for f in dataclasses.fields(model.args)})
    out["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return out


def check_same(fingerprints: list[dict]) -> None:
    """Refuse, on every rank, inputs that differ between ranks: one line naming the first rank that differs
    from rank 0 and what differs (with both values, for options, config and dtype)."""
    first = fingerprints[0]
    for rank, other in enumerate(fingerprints[1:], 1):
        differ = [name for name in first if other.get(name) != first[name]]
        if differ:
            shown = [name if name in ("token ids", "chunk bounds") else
                     f"{name} {other.get(name)} (rank 0: {first[name]})" for name in differ[:4]]
            more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
            raise RankFailed(f"rank {rank} differs from rank 0 in {', '.join(shown)}{more}; every rank needs the "
                             "same prompt, question, options, checkpoint and dtype", bad_input=True)


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
    check_same(agree(group, report=fingerprint(model, header, context, question, bounds, cfg)))
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
    pairs = [pair for local_pairs, _, _ in reports for pair in local_pairs]  # (I_c, index); NaN arrives as NaN
    best = sorted(pairs, key=lambda pair: keep_order(*pair))[:cfg.keep_chunks]  # ChunkQueue's rule
    keep, owner = sorted(index for _, index in best), torch.zeros(len(bounds), dtype=torch.long)
    for r, s in enumerate(share):
        owner[s.start:s.stop] = r
    mine = {c.index: c for c in local if c.index in keep}  # the rest of the local top-k is freed here
    del queue, local
    all_scores = [x for _, rank_scores, _ in reports for x in rank_scores]  # rank order = document order
    # The K/V exchange in two steps, so that a failure reaches every rank at once: first each rank makes the
    # tensors it sends or receives into (where out of memory strikes) and the ranks agree; then only messages move.
    outgoing, incoming, error = {}, {}, None
    try:
        for i in keep:
            if rank != 0 and i in mine:
                outgoing[i] = pack(mine.pop(i))  # the chunk's own tensors are freed as their copy is made
            elif rank == 0 and i not in mine:
                incoming[i] = receive_buffers(model, bounds[i], len(header), cfg.kv_capacity, device)
    except Exception as e:
        error = e
    agree(group, error)
    kept, moved = None, 0
    try:  # both ends walk the kept chunks in document order, so sends and receives pair up
        for i in keep:
            for tensor in outgoing.pop(i, ()):
                dist.send(tensor, group_dst=0, group=group)
            for tensor in incoming.get(i, ()):
                dist.recv(tensor, group_src=int(owner[i]), group=group)
                moved += tensor.numel() * tensor.element_size()
        for i, (kv, idx) in incoming.items():
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


def pack(chunk: EncodedChunk) -> tuple[torch.Tensor, torch.Tensor]:
    """A kept chunk as two messages: (K, V) of every layer [2, L, Hkv, S, hd] and the indices [L, Hkv, S]."""
    return torch.stack([torch.stack(chunk.keys), torch.stack(chunk.values)]), torch.stack(chunk.kept)


def receive_buffers(model, bound: tuple[int, int], n_header: int, kv_capacity: int | None, device):
    """Empty tensors for one kept chunk's pack(). Rank 0 knows S without asking: parallelcomp.kept_length."""
    args, s = model.args, kept_length(n_header, bound[1] - bound[0], kv_capacity)
    kv = torch.empty(2, args.n_layers, args.n_kv_heads, s, args.head_dim, dtype=next(model.parameters()).dtype,
                     device=device)
    return kv, torch.empty(args.n_layers, args.n_kv_heads, s, dtype=torch.long, device=device)


# ----------------------------------------------------------------------------------------------------
# The whole method over ranks

def answer(model, tokenizer, context: str, question: str, config=None, *, group: dist.ProcessGroup,
           method: str = "parallelcomp", max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
           seed: int | None = None, chat: bool = False, full_max_tokens: int | None = None, progress=None,
           on_text=None, trace: bool = False, instruction: str = ""):
    """parallelcomp.answer with the chunk prefill spread over the ranks of `group` (a group from setup()); every
    rank calls it with the same arguments. Rank 0 returns the Result (stats add ranks, rank_prefill_s,
    kv_bytes_moved and report_bytes; the trace adds chunk_rank), the other ranks None. Every rank returns only
    once rank 0 has decoded, and waits for that without the timeout (wait_for_first); an error on rank 0 ends
    every rank. method "full" (the baseline) runs on rank 0 alone."""
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    result, error = None, None
    if method == "full":
        try:
            if is_first(group):
                result = answer_one(model, tokenizer, context, question, config, method, chat=chat,
                                    full_max_tokens=full_max_tokens, progress=progress, on_text=on_text, trace=trace,
                                    instruction=instruction, **sampling)
        except Exception as e:
            error = e
        wait_for_first(group, error)
        return result
    with together(group):  # a prompt that one rank refuses, every rank refuses
        prompt = prepare(model, tokenizer, context, question, config, chat, instruction, max_new_tokens)
    t0, bounds = time.perf_counter(), split_chunks(prompt.strength, prompt.cfg.chunk_size)
    out = prefill_chunks_distributed(model, prompt.header, prompt.context, prompt.question, bounds, prompt.cfg,
                                     progress, group)
    if out is not None:  # rank 0: parallelcomp's stages 4-7
        try:
            kept, scores, ranks = out
            cache, logits, next_pos = read_question(model, kept, len(prompt.header), prompt.question, prompt.cfg)
            info = {"bounds": bounds, "scores": scores, "kept": [c.index for c in kept], "cache": cache}
            result = finish(model, tokenizer, prompt, cache, logits, next_pos, info, elapsed(t0, logits.device),
                            on_text=on_text, trace=trace, **sampling)
            result.stats.update(ranks=len(ranks["rank_prefill_s"]), rank_prefill_s=ranks["rank_prefill_s"],
                                kv_bytes_moved=ranks["kv_bytes_moved"], report_bytes=ranks["report_bytes"])
            if trace:
                result.trace["chunk_rank"] = ranks["chunk_rank"]  # the rank that encoded each chunk
        except Exception as e:
            error = e
    wait_for_first(group, error)
    return result
