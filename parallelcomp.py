"""ParallelComp (Xiong et al., ICML 2025, arXiv 2502.14317): training-free length extrapolation for Llama.

The input never goes through attention as a whole. This file reads top to bottom in the order data flows:

  1. split_chunks      chunks that fit the trained window, cut at line/sentence ends                (Sec. 3.1)
  2. encode_chunks     each chunk's K/V, positions reused from 0 in every chunk, chunks in parallel  (Sec. 3.1)
  3. score_chunk       the question over one chunk: I_c (Eq. 3) and the chunk's KV eviction     (Sec. 3.2-3.3, Eqs. 3, 5-7)
     keep_best         a fixed-size priority queue keeps the k chunks of lowest I_c               (Sec. 3.2)
  4. assemble_cache    the kept chunks' K/V in document order, one header                         (Sec. 3.3)
  5. prefill_question  the question over the assembled cache, bottom-right causal                  (Eqs. 9-11)
  6. Calibration       inside the question's prefill: evict sink/recent/middle outlier tokens       (Sec. 4, Eq. 8)
  7. decode            greedy (default) or temperature/top-p sampling

A chunk input is  header + chunk + question.  The header + chunk part never sees the question (causal
attention), so stage 2 runs without it and stage 3 feeds the question over the chunk's K/V: the same numbers as
one forward over the chunk input. A one-shot run (`answer`) streams the chunks and keeps the k best; a document
session (session.py) keeps every chunk's K/V and runs stages 3-7 per question.

Shapes: H query heads, Hkv key/value heads, g = H / Hkv, hd head dim, T tokens in a chunk input, S cached tokens.
The header is what the tokenizer puts before any text (a BOS, or nothing) plus an optional chat prefix and
instruction. Docstrings say where we differ from the authors' released code and why.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model import KVCache, ModelArgs, Transformer

REGIONS = ("sink", "recent", "middle", "all")


class ConfigError(ValueError):
    """An option value that makes no sense; the message names the option and the valid range.
    `about` names the input at fault where a caller may want to say where it came from ("question")."""

    def __init__(self, message: str, about: str | None = None):
        super().__init__(message)
        self.about = about


# ----------------------------------------------------------------------------------------------------
# Configuration

@dataclass
class ParallelCompConfig:
    chunk_size: int | None = None  # context tokens per chunk; None: trained window - header - question - margin
    keep_chunks: int = 3  # k: chunks kept by the priority queue (authors: 3 Llama-2/3, 4 Llama-3.1, 1 retrieval)
    kv_capacity: int | None = None  # context tokens kept per chunk by KV eviction; None: no eviction
    window: int = 8  # observation window: last rows of the chunk input that score its keys
    pool_kernel: int = 7  # max-pool kernel over the KV scores (stride 1, same padding)
    calibration: list[tuple[str, int, int]] = field(default_factory=list)  # (region, first, last), 1-based layers
    calibration_threshold: float = 0.1  # lambda: attention above this marks a bias token
    calibration_rows: int = 1  # r: last question rows whose attention is averaged
    region_size: int = 100  # sink = first, recent = last `region_size` tokens of each chunk
    chunk_batch: int = 4  # chunks per forward pass: the "parallel" in ParallelComp

    def validate(self, args: ModelArgs) -> None:
        for name in ("chunk_size", "kv_capacity", "keep_chunks", "window", "pool_kernel", "calibration_rows",
                     "region_size", "chunk_batch"):
            value = getattr(self, name)
            if not (value is None and name in ("chunk_size", "kv_capacity")) and not (
                    isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.pool_kernel % 2 == 0:
            raise ConfigError(f"pool_kernel must be odd (same padding), got {self.pool_kernel}")
        if self.kv_capacity is not None and self.chunk_size is not None and self.kv_capacity > self.chunk_size:
            raise ConfigError(f"kv_capacity ({self.kv_capacity}) is larger than a chunk ({self.chunk_size} tokens); "
                              "it must be at most chunk_size")
        if not 0.0 < self.calibration_threshold <= 1.0:
            raise ConfigError(f"calibration_threshold must be in (0, 1], got {self.calibration_threshold}")
        for region, first, last in self.calibration:
            if region not in REGIONS:
                raise ConfigError(f"calibration region {region!r} unknown; use one of {', '.join(REGIONS)}")
            if not 1 <= first <= last <= args.n_layers:
                raise ConfigError(f"calibration layers {first}-{last} are outside the model's layers "
                                  f"1-{args.n_layers} (1-based, first <= last)")
        self.rules_by_layer()  # overlapping rules fail here, not after the whole prefill

    def rules_by_layer(self) -> dict[int, str]:
        """0-based layer -> region. A layer named by two rules is an error: which region would win is unclear."""
        out: dict[int, str] = {}
        for region, first, last in self.calibration:
            for layer in range(first - 1, last):
                if layer in out:
                    raise ConfigError(f"layer {layer + 1} is covered by two calibration rules")
                out[layer] = region
        return out


def paper_calibration(n_layers: int) -> list[tuple[str, int, int]]:
    """The paper's best setting (Table 6, "Ours-calibration") scaled to the model's depth:
    middle in the first quarter of layers, recent in the second, sink in the last (32 layers: 1-8, 9-16, 25-32)."""
    q = max(1, n_layers // 4)
    rules = [("middle", 1, q), ("recent", q + 1, min(2 * q, n_layers)), ("sink", max(n_layers - q + 1, 1), n_layers)]
    seen, out = set(), []
    for region, first, last in rules:  # very shallow models: drop layers already covered
        layers = [i for i in range(first, last + 1) if i not in seen]
        if layers:
            out.append((region, layers[0], layers[-1]))
            seen.update(layers)
    return out


# ----------------------------------------------------------------------------------------------------
# Stage 1: chunking (Sec. 3.1)

SENTENCE_ENDS = (".", "!", "?", "。", "！", "？", '."', ".'", ".)", '?"', '!"')


def boundary_strength(token_texts: list[str]) -> torch.Tensor:
    """Per vocabulary id: 2 if the token ends a line, 1 if it ends a sentence, else 0. [vocab] int8."""
    def strength(text: str) -> int:
        if text.endswith("\n"):
            return 2
        return 1 if text.rstrip(" ").endswith(SENTENCE_ENDS) else 0
    return torch.tensor([strength(t) for t in token_texts], dtype=torch.int8)


def split_chunks(strength: torch.Tensor, chunk_size: int, tail: float = 0.15) -> list[tuple[int, int]]:
    """Split N context tokens into near-equal chunks of at most chunk_size tokens, cut at natural boundaries.

    The count is planned once: C = ceil(N / chunk_size), or the next count up (at most 8 more) that lets every
    cut fall on a line or sentence end, since with N just under C * chunk_size no cut has room to move (README:
    chunking). For a count C, cut i is planned at round(i * N / C) and placed by plan_cuts.

    strength: [N] boundary strength of each context token (see boundary_strength). Returns [(start, end)]
    covering 0..N exactly once. The released code instead splits the *text* evenly by characters, which cuts
    mid-sentence; the boundary effect on the question's first token then swamps the relevance signal of stage 2."""
    n = len(strength)
    first = max(1, math.ceil(n / chunk_size))
    best = None
    for count in range(first, min(first + 8, n) + 1):
        cuts, hard = plan_cuts(strength, chunk_size, count, max(1, int(chunk_size * tail)))
        if best is None or hard < best[1]:
            best = cuts, hard
        if hard == 0:
            break
    return list(zip(best[0][:-1], best[0][1:]))


def plan_cuts(strength: torch.Tensor, chunk_size: int, count: int, slack: int) -> tuple[list[int], int]:
    """Cut N tokens into `count` chunks of at most chunk_size: cut i may move from its planned point
    round(i * N / count) to a line or sentence end at most `slack` tokens away, or stay on it (a hard cut).
    Of all placements, the one with the fewest hard cuts, then the fewest cuts at a sentence end that is not a
    line end, then the smallest total distance to the plan (ties: the earlier cut): a shortest path over the
    candidate cuts, one step per cut (a greedy choice runs out of room). Line ends first: a sentence end inside
    a line can split one statement (README: chunking).
    Returns (cuts 0 = c_0 < c_1 < ... < c_count = N, number of hard cuts)."""
    n = len(strength)
    unit = 2 * slack + 1  # more than any distance to the plan
    sentence, hard = float(unit), float(2 * count * unit)  # one hard cut costs more than all other cuts together
    ends = strength.long()  # a cut at e ends the chunk after token e - 1: a line (2), sentence (1) or hard (0) cut
    pos, cost, steps = torch.tensor([0]), torch.zeros(1, dtype=torch.float64), []
    for i in range(1, count):
        planned = round(i * n / count)
        window = torch.arange(max(1, planned - slack), min(n - 1, planned + slack) + 1)
        cand = torch.cat([window[ends[window - 1] > 0], torch.tensor([planned])]).unique()  # (J,) sorted
        own = (cand - planned).abs().double() + hard * (ends[cand - 1] == 0) + sentence * (ends[cand - 1] == 1)
        length = cand[None, :] - pos[:, None]  # (K, J): the chunk between a previous cut and a candidate
        total = (cost[:, None] + own[None, :]).masked_fill((length <= 0) | (length > chunk_size), math.inf)
        cost, best_prev = total.min(0)  # the planned points always form a valid path, so cost stays finite
        steps.append((cand, best_prev))
        pos = cand
    j = int(cost.masked_fill(n - pos > chunk_size, math.inf).argmin())  # the last chunk must fit too
    cuts = [n]
    for cand, best_prev in reversed(steps):
        cuts.append(int(cand[j]))
        j = int(best_prev[j])
    cuts.append(0)
    cuts.reverse()
    return cuts, sum(int(strength[c - 1] == 0) for c in cuts[1:-1])


# ----------------------------------------------------------------------------------------------------
# Stage 2: the chunks' own K/V, with position reuse, in parallel (Sec. 3.1)

@dataclass
class ChunkKV:
    """One chunk's question-independent part after its prefill: the K/V of header + chunk tokens."""
    index: int  # chunk number in the document
    start: int  # offsets into the context ids
    end: int
    keys: list[torch.Tensor]  # per layer [Hkv, T, hd], T = n_header + end - start
    values: list[torch.Tensor]
    tail_queries: list[torch.Tensor]  # per layer [H, w, hd]: the last w = min(window, T) rows (stage 3)
    last_logits: torch.Tensor  # [vocab] float32 at the last token: the prediction of the question's first token


class ChunkPrefill:
    """The cache hook (model.CacheHook) of a batch of chunk prefills: ordinary causal attention; each chunk's
    K/V (its own memory, padding cut off) and its last `window` queries are stored, per layer."""

    def __init__(self, lengths: list[int], window: int):
        self.lengths, self.window = lengths, window
        self.k, self.v, self.q = ([[] for _ in lengths] for _ in range(3))

    def update(self, layer, q, k, v):
        for b, n in enumerate(self.lengths):
            self.k[b].append(k[b, :, :n].clone())
            self.v[b].append(v[b, :, :n].clone())
            self.q[b].append(q[b, :, max(0, n - self.window):n].clone())
        return k, v


@torch.inference_mode()
def encode_chunks(model: Transformer, header: torch.Tensor, context: torch.Tensor, bounds: list[tuple[int, int]],
                  first_index: int, window: int) -> list[ChunkKV]:
    """Stage 2 for a batch of chunks in one forward: header + context[start:end], right-padded (exact under the
    causal mask), each at positions 0..n_c-1 (position reuse). Logits only at each chunk's last token."""
    lengths = [len(header) + end - start for start, end in bounds]
    tokens = torch.zeros(len(bounds), max(lengths), dtype=torch.long, device=context.device)  # (B, T)
    for b, (start, end) in enumerate(bounds):
        tokens[b, :lengths[b]] = torch.cat([header, context[start:end]])
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    hook = ChunkPrefill(lengths, window)
    last = torch.tensor(lengths, device=tokens.device)[:, None] - 1  # (B, 1)
    logits = model(tokens, positions, hook, logits_at=last)[:, 0]  # (B, vocab)
    return [ChunkKV(first_index + b, start, end, hook.k[b], hook.v[b], hook.q[b], logits[b])
            for b, (start, end) in enumerate(bounds)]


def stream_chunks(model: Transformer, header: torch.Tensor, context: torch.Tensor, bounds: list[tuple[int, int]],
                  cfg: ParallelCompConfig, progress=None, first_index: int = 0):
    """Every chunk's ChunkKV, `chunk_batch` chunks per forward, lazily (a one-shot run holds one batch at a time);
    progress(done, total) after each batch."""
    for first in range(0, len(bounds), cfg.chunk_batch):
        batch = bounds[first:first + cfg.chunk_batch]
        yield from encode_chunks(model, header, context, batch, first_index + first, cfg.window)
        if progress is not None:
            progress(first + len(batch), len(bounds))


# ----------------------------------------------------------------------------------------------------
# Stage 3: the question over each chunk: its score (Sec. 3.2, Eq. 3) and its KV eviction (Sec. 3.3, Eqs. 5-7)

def question_nll(logits: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """Eq. 3: I_c = -log P(q | chunk_c) / |q|, the question's self-information given the chunk.
    logits: [B, Q, vocab], the rows just before each question token; question: [Q] ids. Returns [B] float32.
    Lower = the chunk makes the question more predictable = more relevant."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, Q, V)
    return -logp.gather(-1, question.expand(logits.shape[0], -1)[..., None]).squeeze(-1).mean(-1)


def snapkv_scores(q_win: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Eqs. 5-6: the attention of a chunk input's last W query rows over its T keys, summed over the rows.
    q_win: [H, W, hd], the rows at positions T-W..T-1 (causal: row i sees keys 0..T-W+i); k: [Hkv, T, hd].
    GQA: scored per query head, then averaged over the heads sharing a KV head (the released code expands the
    cache to H heads instead, 4x the memory on Llama-3). flash-attn returns no probabilities, so this small
    (W x T) score is an explicit matmul. Returns [Hkv, T] float32."""
    h, w, hd = q_win.shape
    hkv, t = k.shape[0], k.shape[1]
    g = h // hkv
    logits = (q_win.reshape(hkv, g * w, hd) @ k.transpose(-1, -2)).float() / math.sqrt(hd)  # (Hkv, g*W, T)
    visible = torch.arange(t, device=k.device)[None] <= t - w + torch.arange(w, device=k.device)[:, None]  # (W, T)
    logits = logits.masked_fill(~visible.repeat(g, 1), float("-inf"))  # heads of a KV group are adjacent
    return torch.softmax(logits, dim=-1).view(hkv, g, w, t).sum(2).mean(1)  # (Hkv, T)


def kept_length(n_header: int, n_context: int, capacity: int | None) -> int:
    """Tokens a chunk keeps after KV eviction: its header and at most `capacity` context tokens."""
    return n_header + min(n_context, capacity or n_context)


def snapkv_keep(scores: torch.Tensor, n_header: int, n_context: int, capacity: int | None, kernel: int) -> torch.Tensor:
    """Eq. 7: indices (into the chunk input) of the tokens one chunk keeps: its header, plus per KV head the top
    `capacity` context tokens by max-pooled score, in original order. The question copy is never kept.
    scores: [Hkv, T] for one chunk. Pooling runs over the context tokens only, so neither the header's nor the
    question's scores leak into their neighbours. Ties go to the earlier token.
    Returns [Hkv, kept_length(n_header, n_context, capacity)]."""
    hkv = scores.shape[0]
    if capacity is None or capacity >= n_context:
        return torch.arange(n_header + n_context, device=scores.device).expand(hkv, -1)
    ctx = scores[:, n_header:n_header + n_context]  # (Hkv, n_context)
    pooled = F.max_pool1d(ctx[:, None], kernel, stride=1, padding=kernel // 2).squeeze(1)  # (Hkv, n_context)
    top = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[:, :capacity]
    header = torch.arange(n_header, device=scores.device).expand(hkv, n_header)
    return torch.cat([header, n_header + top.sort(dim=-1).values], dim=-1)


def take_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per KV head, the cached tokens at `idx`: x [..., Hkv, S, hd], idx [Hkv, S'] -> [..., Hkv, S', hd].
    The one gather behind both KV eviction (stage 3) and calibration (stage 6); the result owns its memory."""
    return x.gather(-2, idx[:, :, None].expand(*x.shape[:-3], -1, -1, x.shape[-1]))


@dataclass
class EncodedChunk:
    """A chunk after stage 3: its score, and per layer the kept K/V ([Hkv, S, hd]) and their indices ([Hkv, S])
    into the chunk input (header + context)."""
    index: int
    start: int  # offsets into the context ids
    end: int
    score: float
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    kept: list[torch.Tensor]


class QuestionOverChunk:
    """The cache hook of the question's pass over one chunk: in every layer the question attends to the chunk's
    K/V and causally to itself, as in one forward over header + chunk + question. With KV eviction the last
    `window` rows (the question's, preceded by the chunk's tail when the question is shorter) score the chunk's
    keys; only the kept header + context tokens are stored. The chunk's own logits and I_c are unaffected."""

    def __init__(self, chunk: ChunkKV, n_header: int, cfg: ParallelCompConfig):
        self.chunk, self.n_header, self.cfg = chunk, n_header, cfg
        self.kept, self.kept_k, self.kept_v = [], [], []

    def update(self, layer, q, k, v):
        ck, cv = self.chunk.keys[layer], self.chunk.values[layer]  # (Hkv, T, hd)
        keys, values = torch.cat([ck[None], k], dim=2), torch.cat([cv[None], v], dim=2)  # (1, Hkv, T+Q, hd)
        if self.cfg.kv_capacity is None:
            idx = torch.arange(ck.shape[1], device=ck.device).expand(ck.shape[0], -1)
            self.kept_k.append(ck)
            self.kept_v.append(cv)
        else:
            rows = torch.cat([self.chunk.tail_queries[layer], q[0]], dim=1)[:, -self.cfg.window:]  # (H, W, hd)
            idx = snapkv_keep(snapkv_scores(rows, keys[0]), self.n_header, ck.shape[1] - self.n_header,
                              self.cfg.kv_capacity, self.cfg.pool_kernel)
            self.kept_k.append(take_tokens(ck, idx))
            self.kept_v.append(take_tokens(cv, idx))
        self.kept.append(idx)
        return keys, values


@torch.inference_mode()
def score_chunk(model: Transformer, chunk: ChunkKV, question: torch.Tensor, n_header: int,
                cfg: ParallelCompConfig) -> EncodedChunk:
    """Stage 3 for one chunk: feed the question over the chunk's cached K/V at positions T, T+1, ... (where it
    sits in the chunk input header + chunk + question), read I_c off the rows before each question token (the
    first from the chunk's own last logits), and keep the chunk's KV-eviction survivors."""
    t, n_q = chunk.keys[0].shape[1], len(question)
    positions = torch.arange(t, t + n_q, device=question.device)[None]
    hook = QuestionOverChunk(chunk, n_header, cfg)
    rows = torch.arange(n_q - 1, device=question.device)[None]  # the last question token predicts nothing
    logits = torch.cat([chunk.last_logits[None], model(question[None], positions, hook, logits_at=rows)[0]])
    score = float(question_nll(logits[None], question)[0])
    return EncodedChunk(chunk.index, chunk.start, chunk.end, score, hook.kept_k, hook.kept_v, hook.kept)


def keep_order(score: float, index: int) -> tuple[float, int]:
    """The keep rule's sort key: lowest I_c first, ties to the earlier chunk, a NaN score (a broken chunk
    forward) last. Every top-k in the project (ChunkQueue, distributed.py's global top-k) uses it."""
    return (math.inf if math.isnan(score) else score, index)


class ChunkQueue:
    """Fixed-size priority queue keeping the k chunks first in keep_order. It never holds more than k chunks' KV
    caches, so memory does not grow with the input length. The authors' `topk_windows` keeps the *highest* NLL
    when positive; `keep_chunks` here always keeps the lowest."""

    def __init__(self, k: int):
        self.k, self.heap = k, []

    def push(self, chunk: EncodedChunk) -> None:
        score, index = keep_order(chunk.score, chunk.index)  # the heap's top is the worst kept chunk
        heapq.heappush(self.heap, (-score, -index, chunk))  # indices are unique: chunks are never compared
        if len(self.heap) > self.k:
            heapq.heappop(self.heap)  # drop the worst; its KV cache is freed here

    def kept(self) -> list[EncodedChunk]:
        """Kept chunks in document order."""
        return sorted((entry[-1] for entry in self.heap), key=lambda c: c.index)


def keep_best(model: Transformer, chunks, question: torch.Tensor, n_header: int,
              cfg: ParallelCompConfig) -> tuple[list[EncodedChunk], torch.Tensor]:
    """Stage 3 over a stream of ChunkKV: score each, keep the `keep_chunks` best (the queue).
    Returns (kept chunks in document order, every score [C] float32 in stream order)."""
    queue, scores = ChunkQueue(cfg.keep_chunks), []
    for chunk in chunks:
        encoded = score_chunk(model, chunk, question, n_header, cfg)
        scores.append(encoded.score)
        queue.push(encoded)
    return queue.kept(), torch.tensor(scores, dtype=torch.float32)


def prefill_chunks(model: Transformer, header: torch.Tensor, context: torch.Tensor, question: torch.Tensor,
                   bounds: list[tuple[int, int]], cfg: ParallelCompConfig, progress=None, first_index: int = 0):
    """Stages 2-3 of a one-shot run: the chunks stream by a batch at a time and only the k best stay.
    first_index: the index of bounds[0] among all chunks (distributed.py gives each rank a block of them).
    Returns (kept chunks in document order, all scores [C] in document order)."""
    stream = stream_chunks(model, header, context, bounds, cfg, progress, first_index)
    return keep_best(model, stream, question, len(header), cfg)


# ----------------------------------------------------------------------------------------------------
# Stage 4: assemble the cache

class AssembledCache(KVCache):
    """The kept chunks' KV, concatenated per layer in document order, each key at the rotary position it was
    encoded with (positions overlap across chunks, by design); the question and generated tokens append to it.
    Per layer and cached token: its position in its chunk, its chunk's length (header + context: stage 6's
    regions) and its offset into the context ids (header tokens: -n_header..-1)."""

    def __init__(self, kept: list[EncodedChunk], n_header: int):
        n_layers = len(kept[0].keys)
        super().__init__(n_layers)
        self.pos, self.chunk_len, self.offset = [], [], []
        for layer in range(n_layers):
            ks, vs, pos, clen, off = [], [], [], [], []
            for i, c in enumerate(kept):
                idx, s = c.kept[layer], 0 if i == 0 else n_header  # later chunks drop their header
                ks.append(c.keys[layer][:, s:])
                vs.append(c.values[layer][:, s:])
                pos.append(idx[:, s:])
                clen.append(torch.full_like(idx[:, s:], n_header + c.end - c.start))
                off.append(torch.where(idx[:, s:] < n_header, idx[:, s:] - n_header, idx[:, s:] - n_header + c.start))
            self.replace(layer, torch.cat(ks, 1)[None], torch.cat(vs, 1)[None])  # (1, Hkv, S, hd)
            self.pos.append(torch.cat(pos, 1))  # (Hkv, S)
            self.chunk_len.append(torch.cat(clen, 1))
            self.offset.append(torch.cat(off, 1))
        self.kv_offsets = list(self.offset)  # for the trace: after KV eviction, before calibration

    def evict(self, layer: int, keep: torch.Tensor) -> None:
        """Keep only the cached tokens `keep` [Hkv, S'] of one layer (their bookkeeping follows)."""
        self.replace(layer, take_tokens(self.keys(layer), keep), take_tokens(self.values(layer), keep))
        self.pos[layer], self.offset[layer] = self.pos[layer].gather(1, keep), self.offset[layer].gather(1, keep)
        self.chunk_len[layer] = self.chunk_len[layer].gather(1, keep)


def assemble_cache(kept: list[EncodedChunk], n_header: int) -> tuple[AssembledCache, int]:
    """Stage 4. Returns (cache, M) with M = n_header + the longest kept chunk's context length, counted before
    KV eviction: the question's positions continue right after the longest chunk."""
    return AssembledCache(kept, n_header), n_header + max(c.end - c.start for c in kept)


# ----------------------------------------------------------------------------------------------------
# Stage 5: the question over the assembled cache (Eqs. 9-11)

@torch.inference_mode()
def prefill_question(model: Transformer, cache: AssembledCache, question: torch.Tensor, start_pos: int,
                     cfg: ParallelCompConfig) -> torch.Tensor:
    """Feed the question once at positions M, M+1, ...; each token attends to every cached token and causally to
    earlier question tokens (bottom-right alignment: model.attention). With calibration rules, this forward
    goes through the Calibration hook (stage 6), which evicts bias tokens from the cache in the covered layers
    before they attend. Returns the logits of the last question token [vocab] float32."""
    positions = torch.arange(start_pos, start_pos + len(question), device=question.device)[None]
    hook = Calibration(cache, cfg) if cfg.calibration else cache
    last = torch.tensor([[len(question) - 1]], device=question.device)
    return model(question[None], positions, hook, logits_at=last)[0, 0]


# ----------------------------------------------------------------------------------------------------
# Stage 6: attention calibration (Sec. 4, Eq. 8; Tables 6 and 8)

def calibration_scores(q: torch.Tensor, cached_k: torch.Tensor, new_k: torch.Tensor, rows: int) -> torch.Tensor:
    """Attention of the question's last `rows` query rows over cache + question keys (bottom-right causal among
    the question tokens; the released code uses no mask for several rows), averaged over the rows, then the
    largest over the query heads of each KV group. q: [1, H, Q, hd]; cached_k: [1, Hkv, S, hd];
    new_k: [1, Hkv, Q, hd]. Returns [Hkv, S] float32: the scores of the cached tokens.

    GQA: the released code scores per query head. The cache stays at Hkv heads here, so a token is flagged for
    a KV head when *any* of its query heads exceeds lambda: the group maximum. (A group mean would raise the
    effective threshold up to g times: one head at 0.3 and three at 0.005 average 0.079 < 0.1.)"""
    _, h, n_q, hd = q.shape
    hkv, s = cached_k.shape[1], cached_k.shape[2]
    g, rows = h // hkv, min(rows, n_q)
    keys = torch.cat([cached_k, new_k], dim=2)[0]  # (Hkv, S+Q, hd)
    q_rows = q[0, :, n_q - rows:].reshape(hkv, g * rows, hd)  # heads of one KV group are adjacent: (Hkv, g*r, hd)
    logits = (q_rows @ keys.transpose(-1, -2)).float() / math.sqrt(hd)  # (Hkv, g*r, S+Q)
    visible = torch.arange(s + n_q, device=q.device)[None] <= s + n_q - rows + torch.arange(rows, device=q.device)[:, None]
    logits = logits.masked_fill(~visible.repeat(g, 1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)[:, :, :s].view(hkv, g, rows, s)  # (Hkv, g, r, S)
    return probs.mean(2).amax(1)  # (Hkv, S)


def region_mask(region: str, pos: torch.Tensor, chunk_len: torch.Tensor, size: int) -> torch.Tensor:
    """Regions per chunk (the paper's definition): sink = a chunk's first `size` positions, recent = its last
    `size`, middle = the rest, all = anywhere. (The released code measures them on the whole concatenation.)"""
    sink, recent = pos < size, pos >= chunk_len - size
    return {"sink": sink, "recent": recent, "middle": ~sink & ~recent, "all": torch.ones_like(sink)}[region]


def bias_token_keep(scores: torch.Tensor, in_region: torch.Tensor, threshold: float) -> torch.Tensor:
    """Evict, per KV head, the cached tokens in the rule's region whose score exceeds the threshold. To keep K/V
    rectangular, heads that flag fewer tokens than the head with the most also drop their lowest-scoring ones.
    scores, in_region: [Hkv, S]. Returns the kept indices [Hkv, S - n], in original order."""
    flagged = (scores > threshold) & in_region
    n = int(flagged.sum(-1).max())
    if n == 0:
        return torch.arange(scores.shape[1], device=scores.device).expand(scores.shape[0], -1)
    order = torch.sort(scores.masked_fill(flagged, float("-inf")), dim=-1, stable=True).indices  # flagged first
    return order[:, n:].sort(dim=-1).values


class Calibration:
    """The cache hook (model.CacheHook) of the question's prefill when calibration rules are set: in a layer
    covered by a rule, score the cached tokens by the question's attention, evict that layer's bias tokens from
    the assembled cache, then attend as usual. Evicted tokens stay out for decoding, which uses the cache."""

    def __init__(self, cache: AssembledCache, cfg: ParallelCompConfig):
        self.cache, self.cfg, self.rules = cache, cfg, cfg.rules_by_layer()

    def update(self, layer, q, k, v):
        region = self.rules.get(layer)
        if region is not None:
            c = self.cache
            scores = calibration_scores(q, c.keys(layer), k, self.cfg.calibration_rows)  # (Hkv, S)
            in_region = region_mask(region, c.pos[layer], c.chunk_len[layer], self.cfg.region_size)
            c.evict(layer, bias_token_keep(scores, in_region, self.cfg.calibration_threshold))
        return self.cache.update(layer, q, k, v)


# ----------------------------------------------------------------------------------------------------
# Stage 7: decoding

def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy when temperature == 0; otherwise softmax(logits / T) restricted to the smallest set of tokens
    whose probability reaches top_p (nucleus sampling), renormalised."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    sorted_p[(sorted_p.cumsum(0) - sorted_p) > top_p] = 0.0  # keep tokens until the mass before them reaches top_p
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
    return int(order[choice])


@torch.inference_mode()
def decode(model: Transformer, cache: KVCache, logits: torch.Tensor, next_pos: int, max_new_tokens: int,
           stop_ids, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, on_token=None) -> list[int]:
    """Generate up to max_new_tokens from the logits of the last prompt token; new tokens continue at next_pos and
    are appended to the cache (its compressed size plus the generated tokens). Sampling draws from its own
    generator seeded with `seed` (0 when None), never from torch's global random state."""
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(0 if seed is None else seed)
    out = []
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_p, generator)
        if token in stop_ids:
            break
        out.append(token)
        if on_token is not None:
            on_token(out)
        if i + 1 == max_new_tokens:
            break
        x = torch.tensor([[token]], device=logits.device)
        logits = model(x, torch.tensor([[next_pos]], device=x.device), cache)[0, -1]
        next_pos += 1
    return out


# ----------------------------------------------------------------------------------------------------
# The whole method on token ids, and the baseline

def read_question(model: Transformer, kept: list[EncodedChunk], n_header: int, question: torch.Tensor,
                  cfg: ParallelCompConfig) -> tuple[AssembledCache, torch.Tensor, int]:
    """Stages 4-6: assemble the kept chunks' cache and run the question over it (calibration inside).
    The question has no BOS of its own (the authors' code prepends one). Returns (cache, logits of the last
    question token [vocab], the position of the first generated token)."""
    cache, m = assemble_cache(kept, n_header)
    return cache, prefill_question(model, cache, question, m, cfg), m + len(question)


def run_parallelcomp(model: Transformer, header: torch.Tensor, context: torch.Tensor, question: torch.Tensor,
                     cfg: ParallelCompConfig, strength: torch.Tensor, progress=None, chunk_prefill=None):
    """Stages 1-6 on token ids (cfg.chunk_size set). strength: [N] boundary strength of the context tokens.
    chunk_prefill: stages 2-3 with prefill_chunks' signature (default prefill_chunks; distributed.py passes one
    that spreads the chunks over ranks). Returns (cache, logits of the last question token, next position,
    info: chunk bounds, scores and kept indices, and the cache, for stats and the trace)."""
    bounds = split_chunks(strength, cfg.chunk_size)
    kept, scores = (chunk_prefill or prefill_chunks)(model, header, context, question, bounds, cfg, progress)
    cache, logits, next_pos = read_question(model, kept, len(header), question, cfg)
    return cache, logits, next_pos, {"bounds": bounds, "scores": scores, "kept": [c.index for c in kept],
                                     "cache": cache}


@torch.inference_mode()
def run_full(model: Transformer, tokens: torch.Tensor):
    """Baseline: one ordinary forward over header + context + question at positions 0..N-1."""
    cache = KVCache(len(model.layers))
    positions = torch.arange(len(tokens), device=tokens.device)[None]
    logits = model(tokens[None], positions, cache, logits_at=torch.tensor([[len(tokens) - 1]], device=tokens.device))
    return cache, logits[0, 0], len(tokens)


def middle_truncate(context: torch.Tensor, budget: int) -> torch.Tensor:
    """Keep the first and last budget/2 tokens (the paper's FullKV baseline truncates in the middle)."""
    if len(context) <= budget:
        return context
    head = budget // 2
    return torch.cat([context[:head], context[len(context) - (budget - head):]])


# ----------------------------------------------------------------------------------------------------
# The entry point on text: prepare, prefill, finish

LARGEST_DEFAULT_WINDOW = 32768


def default_chunk_size(args: ModelArgs, n_header: int, n_question: int, max_new_tokens: int) -> int:
    """The model's trained window minus the header, the question and the tokens to generate (the margin), so
    chunk prefill, the question (at positions M..) and the answer all stay inside the trained window.
    A config window above 32K (the longest window models are commonly pre-trained on) describes an extended
    window (Mistral-Nemo says 1,024,000): a default chunk that large would silently be full attention."""
    if args.trained_window > LARGEST_DEFAULT_WINDOW:
        raise ConfigError(f"the checkpoint's config claims a {args.trained_window:,}-token window, too large to "
                          f"derive a chunk size from (above {LARGEST_DEFAULT_WINDOW:,} one chunk would be full "
                          "attention over the whole input); pass --chunk-size (the paper used 3,600-7,600)")
    size = args.trained_window - n_header - n_question - max_new_tokens
    if size < 1:
        raise ConfigError(f"the question ({n_question} tokens){header_note(n_header, ' and')} plus max_new_tokens "
                          f"({max_new_tokens}) leave no room for context in the model's trained window "
                          f"({args.trained_window} tokens); shorten them", about="question")
    return size


def header_note(n_header: int, join: str) -> str:
    return f"{join} the header ({n_header} tokens: BOS, chat prefix, instruction)" if n_header > 1 else ""


def check_prompt(args: ModelArgs, header: torch.Tensor, context: torch.Tensor, question: torch.Tensor) -> None:
    """Refuse prompts that cannot run, before any forward pass (session.py checks each question's part alone)."""
    if len(question) == 0:
        raise ConfigError("the question is empty; pass a question", about="question")
    if len(header) + len(question) > args.trained_window:
        raise ConfigError(f"the question is {len(question)} tokens{header_note(len(header), ' with')}, longer than "
                          f"the model's trained window ({args.trained_window}); shorten it", about="question")
    if len(context) == 0:
        raise ConfigError("the context is empty; give the text to answer the question about")
    if int(torch.cat([header, context, question]).max()) >= args.vocab_size:
        raise ConfigError(f"the tokenizer produced ids beyond the model's vocabulary ({args.vocab_size}); "
                          "the tokenizer files do not belong to this checkpoint")


@dataclass
class Prompt:
    """A prompt as checked token ids on the model's device, with the config it runs under (chunk_size set)."""
    header: torch.Tensor
    context: torch.Tensor
    question: torch.Tensor
    cfg: ParallelCompConfig
    strength: torch.Tensor  # [N] boundary strength of each context token (stage 1)


def prepare(model: Transformer, tokenizer, context: str, question: str, config: ParallelCompConfig | None = None,
            chat: bool = False, instruction: str = "", max_new_tokens: int = 32) -> Prompt:
    """Tokenize (tokenizer.encode_prompt: header, context and question ids; with `chat` the chat template;
    `instruction`, text before the context, ends the header that every chunk input repeats, so every chunk
    reads it and it is not scored as the question), refuse what cannot run, and fill in the default chunk size."""
    device = next(model.parameters()).device
    ids = tokenizer.encode_prompt(context, question, chat, instruction)
    header, context_ids, question_ids = (torch.tensor(x, dtype=torch.long, device=device)
                                         for x in (ids.header, ids.context, ids.question))
    check_prompt(model.args, header, context_ids, question_ids)
    cfg = config or ParallelCompConfig()
    if cfg.chunk_size is None:
        size = default_chunk_size(model.args, len(header), len(question_ids), max_new_tokens)
        cfg = dataclasses.replace(cfg, chunk_size=size)
    cfg.validate(model.args)
    strength = boundary_strength(tokenizer.token_texts)[context_ids.cpu()]
    return Prompt(header, context_ids, question_ids, cfg, strength)


@dataclass
class Result:
    ids: list[int]  # generated token ids (stop token excluded)
    text: str
    stats: dict
    trace: dict[str, torch.Tensor] | None = None


def elapsed(t0: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def answer(model: Transformer, tokenizer, context: str, question: str, config: ParallelCompConfig | None = None,
           method: str = "parallelcomp", max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
           seed: int | None = None, chat: bool = False, full_max_tokens: int | None = None, progress=None,
           on_text=None, trace: bool = False, instruction: str = "", chunk_prefill=None) -> Result:
    """Answer `question` about `context` with `method` ("parallelcomp", or "full": the baseline, whose context
    `full_max_tokens` middle-truncates): prepare, prefill, then finish (decode, stats, the trace when asked).
    progress(done, total) is called per chunk batch; on_text(text_so_far) per generated token; chunk_prefill
    replaces stages 2-3 (see run_parallelcomp)."""
    if method not in ("parallelcomp", "full"):
        raise ConfigError(f"method must be 'parallelcomp' or 'full', got {method!r}")
    prompt = prepare(model, tokenizer, context, question, config, chat, instruction, max_new_tokens)
    t0, info = time.perf_counter(), None
    if method == "parallelcomp":
        cache, logits, next_pos, info = run_parallelcomp(model, prompt.header, prompt.context, prompt.question,
                                                         prompt.cfg, prompt.strength, progress, chunk_prefill)
    else:
        ctx = prompt.context if full_max_tokens is None else middle_truncate(
            prompt.context, max(0, full_max_tokens - len(prompt.header) - len(prompt.question)))
        cache, logits, next_pos = run_full(model, torch.cat([prompt.header, ctx, prompt.question]))
    prefill_s = elapsed(t0, logits.device)
    return finish(model, tokenizer, prompt, cache, logits, next_pos, info, prefill_s, max_new_tokens,
                  temperature, top_p, seed, on_text, trace)


def finish(model: Transformer, tokenizer, prompt: Prompt, cache: KVCache, logits: torch.Tensor, next_pos: int,
           info: dict | None, prefill_s: float, max_new_tokens: int = 32, temperature: float = 0.0,
           top_p: float = 1.0, seed: int | None = None, on_text=None, trace: bool = False) -> Result:
    """Decode from a prefilled cache, then the Result: text, stats and (when asked) the trace.
    info: run_parallelcomp's, or None for the full-attention baseline."""
    n_q = len(prompt.question)
    stats = {"method": "parallelcomp" if info else "full", "input_tokens": len(prompt.header) + len(prompt.context)
             + n_q, "cache_tokens": round(sum(cache.size) / len(cache.size)) - n_q, "prefill_s": prefill_s,
             "cache_bytes": sum(2 * k.numel() * k.element_size() for k in map(cache.keys, range(len(cache.k))))}
    if info:
        stats.update(chunks_total=len(info["bounds"]), chunks_kept=len(info["kept"]), chunk_size=prompt.cfg.chunk_size)
    t1 = time.perf_counter()
    on_token = (lambda out: on_text(tokenizer.decode(out))) if on_text is not None else None
    out = decode(model, cache, logits, next_pos, max_new_tokens, set(tokenizer.stop_ids), temperature, top_p,
                 seed, on_token)
    decode_s = elapsed(t1, logits.device)
    stats.update(decode_s=decode_s, new_tokens=len(out), tokens_per_s=len(out) / decode_s if decode_s > 0 else 0.0)
    result = Result(out, tokenizer.decode(out), stats)
    if trace:
        result.trace = {"header_ids": prompt.header.cpu(), "context_ids": prompt.context.cpu(),
                        "question_ids": prompt.question.cpu(), "generated_ids": torch.tensor(out, dtype=torch.long),
                        "first_logits": logits.float().cpu(), **(make_trace(info) if info else {})}
    return result


def make_trace(info: dict) -> dict[str, torch.Tensor]:
    """Stage-by-stage tensors for porters (see README, "Trace format")."""
    cache: AssembledCache = info["cache"]
    trace = {"chunk_bounds": torch.tensor(info["bounds"], dtype=torch.long),
             "chunk_scores": info["scores"].float(),
             "kept_chunks": torch.tensor(info["kept"], dtype=torch.long)}
    for layer in range(len(cache.k)):
        trace[f"kv_kept.{layer}"] = cache.kv_offsets[layer].to("cpu", copy=True)  # own memory: safetensors
        trace[f"calibration_kept.{layer}"] = cache.offset[layer].to("cpu", copy=True)  # refuses shared storage
    return trace
