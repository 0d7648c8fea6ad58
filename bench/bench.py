"""Speed and memory of ParallelComp against full attention, per input length, on one machine: the measurement.

    python bench/bench.py --shape 20m --lengths 4096,16384,32768,131072 --out bench/results/cpu-20m
    python bench/bench.py --ckpt DIR --device cuda --lengths 32768,131072 --out /tmp/bench

For every length, back to back (slow drifts in machine load hit all methods alike): full attention over all N
tokens, and ParallelComp with 1 and --chunk-batch chunks per forward, each with and without KV eviction to
half a chunk. Each row: prefill seconds, decode ms/token, peak memory (process RSS on CPU, each measurement
in a fresh process; on GPU torch.cuda.max_memory_allocated and _reserved, reset per measurement), and the
FLOPs the prefill had to do over the matmul rate measured in the same process. Weights (unless --ckpt) and
token ids are random. Attention goes through SDPA with the --sdpa backends only, in that order; the log names
the backend each kind of call gets. A row that raises is recorded as failed and the sweep goes on.

Writes results.csv, results.json (for report.py) and log.txt into --out, then report.py's results.md and two
plots. bench/README.md has the details.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import multiprocessing
import sys
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import report  # noqa: E402
from methods import CODES, FULL, Method, from_codes  # noqa: E402
from model import ModelArgs, Transformer, attention, load_args, load_model, rope_inv_freq, use_flash  # noqa: E402
from parallelcomp import ParallelCompConfig, decode, default_chunk_size, run_full, run_parallelcomp  # noqa: E402

# Llama-shaped models with random weights. The 8B/7B rows are the published Llama-3-8B and Llama-2-7B
# configurations; 20m/100m are small Llama-style shapes for CPU; tiny is for smoke tests.
SHAPES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=512,
                 max_position_embeddings=256),
    "20m": dict(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, head_dim=64, hidden_dim=1024, vocab_size=10240,
                max_position_embeddings=2048),
    "100m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64, hidden_dim=2048, vocab_size=32000,
                 max_position_embeddings=2048, tie_embeddings=True),
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                      vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, hidden_dim=11008,
                      vocab_size=32000, max_position_embeddings=4096),
}
QUESTION_TOKENS = 16
KEEP_CHUNKS = 3


@dataclass(frozen=True)
class Setup:
    """What every measurement of a run shares: the command line with device, dtype and warm-up resolved."""
    shape: str | None  # random weights of this SHAPES entry, or
    ckpt: str | None  # a checkpoint folder
    device: str
    dtype: str
    seed: int  # weights and token ids
    threads: int
    decode_tokens: int
    sdpa: list[str]  # SDPA backends allowed, in priority order
    warmup: str  # 'same': each measurement once untimed first; 'small': one small forward per process


# ----------------------------------------------------------------------------------------------------
# Model, inputs and the FLOP count

def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int) -> Transformer:
    """Built on the meta device, materialized once in `dtype`, matrices ~ N(0, 0.02), norm weights 1."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a tied embedding is listed once
            p.normal_(0.0, 0.02, generator=gen) if p.dim() == 2 else p.fill_(1.0)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(args).to(device)  # a float32 buffer, as load_model leaves it
    return model.eval()


def build_model(setup: Setup) -> Transformer:
    device, dtype = torch.device(setup.device), getattr(torch, setup.dtype)
    if setup.ckpt:
        return load_model(setup.ckpt, device=device, dtype=dtype)
    return random_model(ModelArgs(**SHAPES[setup.shape]), device, dtype, setup.seed)


def n_params(args: ModelArgs) -> int:
    with torch.device("meta"):
        model = Transformer(args)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return sum(p.numel() for p in model.parameters())


def make_inputs(args: ModelArgs, n_tokens: int, device: torch.device, seed: int):
    """[BOS] + random context + a random question of QUESTION_TOKENS, n_tokens in all; boundary strength 0
    everywhere (random ids have no sentence ends), so chunks are cut at the token limit."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, args.vocab_size, (n_tokens - 1,), generator=gen)
    header = torch.tensor([1], dtype=torch.long, device=device)
    context, question = ids[:-QUESTION_TOKENS].to(device), ids[-QUESTION_TOKENS:].to(device)
    return header, context, question, torch.zeros(len(context), dtype=torch.int8)


def layer_matmul_params(args: ModelArgs) -> int:
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)  # wq, wo; wk, wv
    return attn + 3 * args.dim * args.hidden_dim  # w1, w3, w2


def forward_flops(args: ModelArgs, t: int, r: int, cached: int = 0) -> float:
    """A causal forward of t new tokens over `cached` earlier keys, LM head on r rows:
        2 * L * P_layer * t            every token through the layer weights (P_layer: attention + MLP matrices)
      + 4 * L * H * hd * pairs         QK^T and PV, a multiply-add per (query, visible key) pair and dim
      + 2 * dim * vocab * r            the LM head on the rows whose logits are needed"""
    attn_pairs = t * cached + t * (t + 1) / 2  # (query, visible key) pairs
    return (2 * args.n_layers * layer_matmul_params(args) * t + 4 * args.n_layers * args.n_heads * args.head_dim
            * attn_pairs + 2 * args.dim * args.vocab_size * r)


def prefill_flops(args: ModelArgs, n_tokens: int, bounds: list | None, cache_tokens: int) -> float:
    """Full attention (bounds None): one forward, t = N, r = 1. ParallelComp: every chunk input (BOS + chunk +
    question copy, r = question tokens) plus the question over the assembled cache. Right-padding of batched
    chunks, KV-eviction scoring and elementwise work are not counted: this is the work the method needs, so
    the achieved rate is a lower bound on the hardware's."""
    if bounds is None:
        return forward_flops(args, n_tokens, 1)
    chunks = sum(forward_flops(args, 1 + end - start + QUESTION_TOKENS, QUESTION_TOKENS) for start, end in bounds)
    return chunks + forward_flops(args, QUESTION_TOKENS, 1, cached=cache_tokens)


# ----------------------------------------------------------------------------------------------------
# Machine: matmul rate, memory, attention backends

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Best of a few square GEMMs, FLOP/s: the machine's ceiling for this dtype on these threads. A CPU
    without bfloat16 units runs half-precision GEMMs ~50x slower than float32 (seen: 0.7 GFLOP/s): smaller."""
    n = 8192 if device.type == "cuda" else 2048 if dtype == torch.float32 else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for i in range(6 if device.type == "cpu" else 8):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i:  # the first is a warm-up
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since start or the last reset_peak) of this process, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release(device: torch.device) -> None:
    """Give the allocator's cached blocks back (GPU): done before a measurement's untimed warm-up, so a
    row's reserved memory is its own and no allocation of the timed run is a fresh cudaMalloc."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> int:
    """Start a new peak-memory window; returns the memory in use now (the baseline: weights, runtime)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass  # then the peak includes the warm-up, which is small
    return rss_bytes("VmRSS")


def peak_bytes(device: torch.device) -> tuple[int, int | None]:
    """(peak allocated, peak reserved) on GPU; (peak RSS, None) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return rss_bytes("VmHWM"), None


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
# The three kinds of call model.attention gets here, as (queries, keys) of a small probe of the model's heads
ATTENTION_CALLS = {"chunk prefill and full attention (Tq = Tk, is_causal)": (64, 64),
                   "question over the assembled cache (Tq < Tk, explicit mask)": (16, 80),
                   "decode step (Tq = 1, no mask)": (1, 80)}


def sdpa_only(names: list[str]):
    """SDPA restricted to these backends, tried in this order."""
    return sdpa_kernel([SDPA_BACKENDS[n] for n in names], set_priority=True)


def first_backend(q: torch.Tensor, k: torch.Tensor, names: list[str]) -> str:
    """The first SDPA backend of `names` that accepts this call of model.attention."""
    for name in names:
        try:
            with warnings.catch_warnings(), sdpa_only([name]):
                warnings.simplefilter("ignore")  # SDPA warns why each refused backend refused
                attention(q, k, k)
            sync(q.device)
            return name
        except RuntimeError:
            continue
    return "none of the allowed backends: these calls fail"


def machine_lines(args: ModelArgs, device: torch.device, dtype: torch.dtype, names: list[str]) -> list[str]:
    """torch, CUDA, cuDNN versions and the attention backend each kind of call gets (flash-attn where
    model.use_flash says so), probed at the model's head counts, head dim and dtype, for the log."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    flash = use_flash(torch.empty(1, device=device, dtype=dtype))
    lines = [f"torch {torch.__version__}; CUDA {torch.version.cuda}; cuDNN {cudnn}; flash-attn "
             f"{'used by model.attention' if flash else 'not used (not installed, or not CUDA in half precision)'}",
             f"SDPA backends allowed, in priority order: {', '.join(names)}"
             + ("" if "cudnn" in names else " (cuDNN left out: it builds a graph per new key length)")]
    for label, (t_q, t_k) in ATTENTION_CALLS.items():
        q = torch.randn(1, args.n_heads, t_q, args.head_dim, device=device, dtype=dtype)
        k = torch.randn(1, args.n_kv_heads, t_k, args.head_dim, device=device, dtype=dtype)
        lines.append(f"  {label}: " + ("flash-attn package (flash_attn_func)" if use_flash(q)
                                       else first_backend(q, k, names)))
    return lines


# ----------------------------------------------------------------------------------------------------
# One measurement

def chunks_per_forward(n_chunks: int, batch: int) -> str:
    """'2x16 + 1x1': forwards x chunks in each, as prefill_chunks runs them (at most `batch` at once)."""
    full, rest = divmod(n_chunks, batch)
    parts = ([f"{full}x{batch}"] if full else []) + ([f"1x{rest}"] if rest else [])
    return " + ".join(parts)


def prefill_and_decode(model: Transformer, setup: Setup, method: Method, inputs, chunk_size: int) -> dict:
    """One run: prefill (timed), then setup.decode_tokens greedy tokens (timed separately)."""
    header, context, question, strength = inputs
    device = header.device
    sync(device)
    t0 = time.perf_counter()
    if method.chunk_batch is None:
        cache, logits, next_pos = run_full(model, torch.cat([header, context, question]))
        bounds, scores, kept = None, None, []
    else:
        cfg = ParallelCompConfig(chunk_size=chunk_size, keep_chunks=KEEP_CHUNKS, chunk_batch=method.chunk_batch,
                                 kv_capacity=chunk_size // 2 if method.kv_eviction else None)
        cfg.validate(model.args)
        cache, logits, next_pos, info = run_parallelcomp(model, header, context, question, cfg, strength)
        bounds, scores, kept = info["bounds"], info["scores"], info["kept"]
    sync(device)
    prefill_s = time.perf_counter() - t0
    cache_tokens = cache.length  # tokens per KV head after prefill (ParallelComp: kept chunks, evicted)
    cache_bytes = sum(2 * cache.keys(i).numel() * cache.keys(i).element_size() for i in range(len(cache.k)))
    t1 = time.perf_counter()
    decode(model, cache, logits, next_pos, setup.decode_tokens + 1, stop_ids=set())  # first token: no forward
    sync(device)
    return {"prefill_s": prefill_s, "decode_s": time.perf_counter() - t1, "cache_tokens": cache_tokens,
            "cache_bytes": cache_bytes, "logits": logits, "bounds": bounds, "scores": scores, "kept": kept}


def measure(model: Transformer, setup: Setup, method: Method, n_tokens: int) -> tuple[dict, dict]:
    """Prefill, then decode setup.decode_tokens tokens: the row (times, peak memory, the FLOP count) and what
    compare_outputs needs (final logits, chunk scores). With setup.warmup == 'same' the identical run goes
    first, untimed (GPU: kernel choice, library heuristics and allocator growth at these shapes happen there)."""
    args, device = model.args, next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = make_inputs(args, n_tokens, device, setup.seed)
    chunk_size = default_chunk_size(args, len(inputs[0]), len(inputs[2]), setup.decode_tokens)
    release(device)
    if setup.warmup == "same":
        prefill_and_decode(model, setup, method, inputs, chunk_size)
    rate = matmul_rate(device, dtype)
    load = os.getloadavg()[0]  # other processes on the machine slow CPU timings: recorded with each row
    baseline = reset_peak(device)
    run = prefill_and_decode(model, setup, method, inputs, chunk_size)
    peak, reserved = peak_bytes(device)
    rate = max(rate, matmul_rate(device, dtype))  # before and after: on a shared machine one probe can land
    # in a busy moment; the higher is the fairer ceiling
    bounds = run["bounds"]
    flops = prefill_flops(args, n_tokens, bounds, run["cache_tokens"] - len(inputs[2]))
    row = {"tokens": n_tokens, "method": method.label, "measured": True, "prefill_s": run["prefill_s"],
           "decode_ms_per_token": 1000 * run["decode_s"] / setup.decode_tokens, "peak_mib": peak / 2**20,
           "baseline_mib": baseline / 2**20, "cache_mib": run["cache_bytes"] / 2**20,
           "cache_tokens": run["cache_tokens"], "chunks": len(bounds) if bounds else 0,
           "chunks_per_forward": chunks_per_forward(len(bounds), method.chunk_batch) if bounds else "",
           "chunk_size": chunk_size, "kept": " ".join(map(str, run["kept"])), "prefill_tflop": flops / 1e12,
           "achieved_gflops": flops / run["prefill_s"] / 1e9, "matmul_gflops": rate / 1e9,
           "of_matmul": flops / run["prefill_s"] / rate, "argmax": int(run["logits"].argmax()), "load_avg": load,
           "warmup": setup.warmup}
    if reserved is not None:
        row["reserved_mib"] = reserved / 2**20
    return row, {k: run[k].float().cpu() for k in ("logits", "scores") if run[k] is not None}


def warm_up(model: Transformer) -> None:
    """A small batched forward first, so one-time setup (oneDNN primitives, cuBLAS handles) is not timed."""
    device = next(model.parameters()).device
    n = min(1024, model.args.trained_window)
    tokens = torch.randint(3, model.args.vocab_size, (2, n), device=device)
    with torch.inference_mode():
        model(tokens, torch.arange(n, device=device).expand(2, -1), logits_at=torch.zeros(2, 1, dtype=torch.long,
                                                                                        device=device))
    sync(device)


def measure_fresh(setup: Setup, method: Method, n_tokens: int) -> tuple[dict, dict]:
    """measure() in a fresh (spawned) process, so the peak RSS is this measurement's alone. What raises there
    raises here, with the child's traceback as its cause."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_here, setup, method, n_tokens).result()


def measure_here(setup: Setup, method: Method, n_tokens: int) -> tuple[dict, dict]:
    """Build the model, warm up and measure, in this process."""
    torch.set_num_threads(setup.threads)
    with sdpa_only(setup.sdpa):
        model = build_model(setup)
        warm_up(model)
        return measure(model, setup, method, n_tokens)


def failed_row(n: int, method: Method, error: BaseException) -> dict:
    """A row that raised: the error's type and first line in the table, the traceback in the log."""
    if isinstance(error, torch.OutOfMemoryError):
        note = "failed: out of memory"
    else:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        note = f"failed: {type(error).__name__}: {first}"
    return {"tokens": n, "method": method.label, "measured": False, "note": note,
            "error": "".join(traceback.format_exception(error)).strip()}


def row_line(r: dict, wall_s: float) -> str:
    """A row for the log, as it finishes."""
    text = r["note"] if not r["measured"] else (
        f"prefill {r['prefill_s']:8.2f} s  decode {r['decode_ms_per_token']:7.1f} ms/tok  peak {r['peak_mib']:8.0f} "
        "MiB" + (f" (reserved {r['reserved_mib']:.0f})" if "reserved_mib" in r else "")
        + f"  {100 * r['of_matmul']:5.1f}% of matmul"
        + (f"  chunks per forward {r['chunks_per_forward']}" if r["chunks_per_forward"] else ""))
    return f"{r['tokens']:>7} {r['method']:<13} {text}  [{wall_s:.0f} s wall]"


# ----------------------------------------------------------------------------------------------------
# The sweep

def sweep(setup: Setup, methods: list[Method], lengths: list[int], full_max: int | None, isolate: bool, log,
          save) -> list[dict]:
    """Every method at every length, back to back, each measurement in a fresh process if `isolate`;
    save(rows) after each row, so a timeout keeps them."""
    rows, model = [], None if isolate else build_model(setup)
    if model is not None:
        warm_up(model)
    for n in lengths:
        here, outputs = {}, {}  # Method -> its row; Method -> its final logits and chunk scores
        for method in methods:
            t0 = time.perf_counter()
            if method == FULL and full_max is not None and n > full_max:
                row = {"tokens": n, "method": method.label, "measured": False,
                       "note": f"skipped: above --full-max {full_max}"}
            else:
                try:
                    row, outputs[method] = measure_fresh(setup, method, n) if isolate else measure(model, setup,
                                                                                                    method, n)
                except Exception as e:  # noqa: BLE001 - one failing row (OOM, a backend error) must not end the sweep
                    row = failed_row(n, method, e)
            if not row["measured"] and model is not None:
                release(next(model.parameters()).device)  # outside the except block: the traceback no longer
                # pins the failed row's tensors
            error = row.pop("error", None)
            log(row_line(row, time.perf_counter() - t0) + (f"\n{error}" if error else ""))
            rows.append(row)
            here[method] = row
            save(rows)
        compare_outputs(here, outputs, setup.dtype)
    return rows


# "Equal output" of b=B against b=1: the same kept chunks and final logits within this fraction of their
# largest magnitude. float32: rounding only (seen: at most 1e-6 absolute on CPU). Half precision: GEMMs over B
# chunks block their sums differently, and every layer rounds to 8 (bf16) or 11 (fp16) mantissa bits; 3% (bf16)
# is what model.attention's two branches differ by on a tiny random model (1.4% seen).
LOGIT_TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 1e-2}


def compare_outputs(here: dict[Method, dict], outputs: dict[Method, dict], dtype: str) -> None:
    """'Equal output': each b > 1 method against b=1 with the same eviction setting, stored on the b > 1 row:
    same kept chunks, max |logit difference| (and its tolerance), the chunk scores' largest difference against
    their gap at the keep boundary, and a verdict: 'yes', 'near tie' (kept chunks differ, but by less than the
    scores' own noise) or 'no'."""
    for method, row in here.items():
        if method.chunk_batch in (None, 1) or method not in outputs or method.one_chunk not in outputs:
            continue
        a, b = outputs[method.one_chunk], outputs[method]
        scale = max(1.0, float(a["logits"].abs().max()))
        row["max_logit_diff_vs_b1"] = float((a["logits"] - b["logits"]).abs().max())
        row["logit_tolerance"] = LOGIT_TOLERANCE[dtype] * scale
        row["same_kept_as_b1"] = row["kept"] == here[method.one_chunk]["kept"]
        scores = a["scores"].sort().values
        row["score_gap_at_keep"] = (float(scores[KEEP_CHUNKS] - scores[KEEP_CHUNKS - 1])
                                    if len(scores) > KEEP_CHUNKS else math.inf)
        row["max_score_diff_vs_b1"] = float((a["scores"] - b["scores"]).abs().max())
        if row["same_kept_as_b1"]:
            row["equal_output"] = "yes" if row["max_logit_diff_vs_b1"] <= row["logit_tolerance"] else "no"
        else:
            near_tie = row["max_score_diff_vs_b1"] >= row["score_gap_at_keep"] / 2  # enough to swap the two
            row["equal_output"] = "near tie" if near_tie else "no"


def extrapolate_full(rows: list[dict]) -> None:
    """Full-attention prefill time at skipped lengths from t = a*N + b*N^2 fitted to the measured lengths
    (least squares, relative error); marked measured=False, extrapolated=True. Memory is not extrapolated."""
    full = [r for r in rows if r["method"] == FULL.label]
    pts = [(r["tokens"], r["prefill_s"]) for r in full if r["measured"]]
    if len(pts) < 2:
        return
    n = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    t = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    design = torch.stack([n, n * n], 1) / t[:, None]  # divide by t: fit relative error
    a, b = torch.linalg.lstsq(design, torch.ones_like(t)[:, None]).solution[:, 0].tolist()
    for r in full:
        if not r["measured"] and r["note"].startswith("skipped"):
            r["prefill_s"], r["extrapolated"] = a * r["tokens"] + b * r["tokens"] ** 2, True
            r["note"] += f"; prefill time extrapolated from t = a*N + b*N^2 fitted to N = " \
                         f"{', '.join(str(p[0]) for p in pts)}"


COLUMNS = ["tokens", "method", "measured", "extrapolated", "prefill_s", "decode_ms_per_token", "peak_mib",
           "reserved_mib", "baseline_mib", "cache_mib", "cache_tokens", "chunks", "chunks_per_forward", "chunk_size",
           "kept", "prefill_tflop", "achieved_gflops", "matmul_gflops", "of_matmul", "load_avg", "warmup", "argmax",
           "equal_output", "same_kept_as_b1", "max_logit_diff_vs_b1", "logit_tolerance", "score_gap_at_keep",
           "max_score_diff_vs_b1", "note"]


def write_rows(out: str, run: dict, rows: list[dict]) -> None:
    """results.csv (one line a row, for people and spreadsheets) and results.json (the run and its rows as
    they are, for report.py)."""
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in COLUMNS})
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**run, "rows": rows}, f, indent=1)


# ----------------------------------------------------------------------------------------------------
# Main

def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if (a.ckpt is None) == (a.shape is None):
        raise SystemExit("error: give --ckpt DIR or --shape NAME (one of them)")
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA GPU")
    codes = [m.strip() for m in a.methods.split(",")]
    if not set(codes) <= set(CODES):
        raise SystemExit(f"error: --methods takes {', '.join(CODES)}; got {a.methods!r}")
    sdpa = [b.strip() for b in a.sdpa.split(",")]
    if not sdpa or not set(sdpa) <= set(SDPA_BACKENDS):
        raise SystemExit(f"error: --sdpa takes a list of {', '.join(SDPA_BACKENDS)}; got {a.sdpa!r}")
    setup = Setup(shape=a.shape, ckpt=a.ckpt, device=device, seed=a.seed, threads=a.threads,
                  dtype=a.dtype if a.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32"),
                  decode_tokens=a.decode_tokens, sdpa=sdpa,
                  warmup=a.warmup if a.warmup != "auto" else ("same" if device == "cuda" else "small"))
    os.makedirs(a.out, exist_ok=True)
    if device == "cpu":
        torch.set_num_threads(a.threads)
    with open(os.path.join(a.out, "log.txt"), "w") as log_file:
        def log(msg):
            print(msg, flush=True)
            log_file.write(msg + "\n")
            log_file.flush()
        run(a, setup, from_codes(codes, a.chunk_batch), log)
    return 0


def run(a: argparse.Namespace, setup: Setup, methods: list[Method], log) -> None:
    """The sweep, its rows written as they come, then the report."""
    lengths = sorted(int(x) for x in a.lengths.split(","))
    isolate = {"auto": setup.device == "cpu", "yes": True, "no": False}[a.isolate]
    args = ModelArgs(**SHAPES[a.shape]) if a.shape else load_args(a.ckpt)
    params = n_params(args)
    title = (f"{a.shape or os.path.basename(os.path.normpath(a.ckpt))} ({params / 1e6:.{0 if params > 1e7 else 2}f}M "
             f"params{', random weights' if a.shape else ''}), {setup.dtype}, {setup.device}"
             + (f", {a.threads} threads" if setup.device == "cpu" else f" ({torch.cuda.get_device_name()})"))
    log(f"# {title}; lengths {lengths}; chunk batch {a.chunk_batch}; "
        f"{'each measurement in a fresh process' if isolate else 'one process'}; warm-up {setup.warmup}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    with sdpa_only(setup.sdpa):
        machine = machine_lines(args, torch.device(setup.device), getattr(torch, setup.dtype), setup.sdpa)
        for line in machine:
            log(line)
        info = {"title": title, "machine": machine, "setup": asdict(setup), "keep_chunks": KEEP_CHUNKS,
                "question_tokens": QUESTION_TOKENS, "logit_tolerance": LOGIT_TOLERANCE[setup.dtype],
                "methods": [asdict(m) for m in methods]}
        rows = sweep(setup, methods, lengths, a.full_max, isolate, log, lambda rows: write_rows(a.out, info, rows))
    extrapolate_full(rows)
    write_rows(a.out, info, rows)
    md, files = report.write(a.out, with_plots=not a.no_plots, log=log)
    log(md)
    log(f"load average at the end {os.getloadavg()[0]:.1f}")
    log(f"wrote {', '.join(['results.csv', 'results.json', 'results.md', 'log.txt'] + files)} to {a.out} "
        f"in {time.perf_counter() - t0:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint folder to load (config.json + *.safetensors) instead of --shape")
    p.add_argument("--shape", choices=list(SHAPES), help="random weights of this Llama shape")
    p.add_argument("--lengths", default="4096,16384,32768", help="input lengths in tokens, comma-separated")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--chunk-batch", type=int, default=8, help="chunks per forward for 'pc b=B' (default 8)")
    p.add_argument("--methods", default=",".join(CODES),
                   help="which to run, comma-separated, of: full (ordinary attention), one / many (ParallelComp "
                        "with 1 / --chunk-batch chunks per forward), one+kv / many+kv (with KV eviction); default all")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (CSV, markdown and log only)")
    p.add_argument("--full-max", type=int, help="run full attention only up to this many tokens; longer: "
                                                "time extrapolated from the measured lengths, labelled as such")
    p.add_argument("--decode-tokens", type=int, default=8, help="tokens decoded after each prefill (default 8)")
    p.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                   help="each measurement in a fresh process (auto: on CPU, where RSS peaks cannot be reset "
                        "reliably; on GPU max_memory_allocated is reset instead)")
    p.add_argument("--sdpa", default="flash,efficient,math",
                   help="SDPA backends allowed, in priority order, of: flash, efficient, cudnn, math (default "
                        "flash,efficient,math: cuDNN builds a graph per new key length, so per decode step)")
    p.add_argument("--warmup", choices=["auto", "same", "small"], default="auto",
                   help="same: run each measurement once untimed on the same input first; small: one small "
                        "forward per process only (auto: same on CUDA, small on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and token ids (default 0)")
    p.add_argument("--out", default="bench/results/run", help="output folder (default bench/results/run)")
    return p


if __name__ == "__main__":
    sys.exit(main())
