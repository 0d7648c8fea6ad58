"""Speed and memory of ParallelComp against full attention, per input length, on one machine.

    python bench/bench.py --shape 20m --lengths 4096,16384,32768,131072 --out bench/results/cpu-20m
    python bench/bench.py --ckpt DIR --device cuda --lengths 32768,131072 --out /tmp/bench

For every length it runs, back to back (so slow drifts in machine load hit all methods alike):

  full          one ordinary forward over all N tokens at positions 0..N-1: the baseline a user would run
  pc b=1        ParallelComp, one chunk per forward (the authors' code's default)
  pc b=B        ParallelComp, up to B chunks per forward (--chunk-batch; the chunks_per_forward column says
                how many really went: 9 chunks at b=16 are one forward of 9)
  ... +kv       the same with KV eviction (kv_capacity = half a chunk, as the authors)

and records prefill seconds, decode ms/token, peak memory (process RSS on CPU, each measurement in a fresh
process so peaks do not mix; on GPU torch.cuda.max_memory_allocated and max_memory_reserved, reset per
measurement) and the FLOPs the prefill had to do over the matmul rate measured in the same process just
before and after (the higher). Weights are random (no checkpoint needed) unless --ckpt is given; token ids
are random. Writes results.csv, results.md, log.txt and two PNG plots (time and memory against input
length, log scales) into --out.

On GPU (--warmup same, the default there) each measurement first runs once untimed on the same input, so
kernel selection, library heuristics and the caching allocator's growth at those shapes are not timed.
Attention goes through SDPA with the backends of --sdpa only, in that priority order (default flash,
efficient, math: cuDNN's backend builds a graph per new key length, i.e. per decode step); the log says
which backend each kind of attention call gets, and the cuDNN version. A row that raises is recorded as
failed, with the error, and the sweep goes on.

FLOP count (prefill_flops): a causal forward over T tokens costs
    2 * L * P_layer * T            every token through the layer weights (P_layer: attention + MLP matrices)
  + 4 * L * H * hd * T(T+1)/2      QK^T and PV, each a multiply-add per (query, visible key) pair and dim
  + 2 * dim * vocab * R            the LM head on the R rows whose logits are needed
Full attention: one sequence, T = N, R = 1. ParallelComp: every chunk input (BOS + chunk + question copy,
R = question tokens) plus the question's prefill over the assembled cache. Right-padding of batched
chunks, KV-eviction scoring (a window of 8 rows) and elementwise work are not counted: this is the work
the method needs, so the achieved rate is a lower bound on the hardware's.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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
PLOT_STYLE = {"full": ("black", "o"), "pc b=1": ("tab:blue", "s"), "pc b=1 +kv": ("tab:cyan", "^")}


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


def build_model(spec: dict) -> Transformer:
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    if spec.get("ckpt"):
        return load_model(spec["ckpt"], device=device, dtype=dtype)
    return random_model(ModelArgs(**SHAPES[spec["shape"]]), device, dtype, spec["seed"])


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
    """A causal forward of t new tokens over `cached` earlier keys, LM head on r rows."""
    attn_pairs = t * cached + t * (t + 1) / 2  # (query, visible key) pairs
    return (2 * args.n_layers * layer_matmul_params(args) * t + 4 * args.n_layers * args.n_heads * args.head_dim
            * attn_pairs + 2 * args.dim * args.vocab_size * r)


def prefill_flops(args: ModelArgs, method: str, n_tokens: int, bounds=None, cache_tokens: int = 0) -> float:
    if method == "full":
        return forward_flops(args, n_tokens, 1)
    chunks = sum(forward_flops(args, 1 + end - start + QUESTION_TOKENS, QUESTION_TOKENS) for start, end in bounds)
    return chunks + forward_flops(args, QUESTION_TOKENS, 1, cached=cache_tokens)


# ----------------------------------------------------------------------------------------------------
# Machine: matmul rate, memory, attention backends

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Best of a few square GEMMs, FLOP/s: the machine's ceiling for this dtype on these threads."""
    n = 8192 if device.type == "cuda" else 2048
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
    """SDPA restricted to these backends, tried in this order (torch >= 2.6 honours the order)."""
    backends = [SDPA_BACKENDS[n] for n in names]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # older torch: no priority argument; its own order among the allowed backends
        return sdpa_kernel(backends)


def attention_backends(args: ModelArgs, device: torch.device, dtype: torch.dtype, names: list[str]) -> dict:
    """Which backend serves each kind of attention call: flash-attn where model.use_flash says so, else the
    first of `names` that accepts a probe of that kind at the model's head counts, head dim and dtype."""
    out = {}
    for label, (t_q, t_k) in ATTENTION_CALLS.items():
        q = torch.randn(1, args.n_heads, t_q, args.head_dim, device=device, dtype=dtype)
        k = torch.randn(1, args.n_kv_heads, t_k, args.head_dim, device=device, dtype=dtype)
        if use_flash(q):
            out[label] = "flash-attn package (flash_attn_func)"
            continue
        out[label] = "none of the allowed backends: these calls fail"
        for name in names:
            try:
                with warnings.catch_warnings(), sdpa_only([name]):
                    warnings.simplefilter("ignore")  # SDPA warns why each refused backend refused
                    attention(q, k, k)
                sync(device)
            except RuntimeError:
                continue
            out[label] = name
            break
    return out


def machine_lines(args: ModelArgs, device: torch.device, dtype: torch.dtype, names: list[str]) -> list[str]:
    """torch, CUDA, cuDNN versions and the attention backend of each kind of call, for the log."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    flash = use_flash(torch.empty(1, device=device, dtype=dtype))
    lines = [f"torch {torch.__version__}; CUDA {torch.version.cuda}; cuDNN {cudnn}; flash-attn "
             f"{'used by model.attention' if flash else 'not used (not installed, or not CUDA in half precision)'}",
             f"SDPA backends allowed, in priority order: {', '.join(names)}"
             + ("" if "cudnn" in names else " (cuDNN left out: it builds a graph per new key length)")]
    for label, backend in attention_backends(args, device, dtype, names).items():
        lines.append(f"  {label}: {backend}")
    return lines


# ----------------------------------------------------------------------------------------------------
# One measurement

KEEP_CHUNKS = 3


def method_config(method: str, chunk_size: int, chunk_batch: int) -> ParallelCompConfig:
    """'pc b=4 +kv' -> chunk_batch 4 with KV eviction to half a chunk (the authors' ~2000 of 3600)."""
    _, batch, *kv = method.split()
    return ParallelCompConfig(chunk_size=chunk_size, keep_chunks=KEEP_CHUNKS, chunk_batch=int(batch[2:]),
                              kv_capacity=chunk_size // 2 if kv else None)


def chunks_per_forward(n_chunks: int, batch: int) -> str:
    """'2x16 + 1x1': forwards x chunks in each, as prefill_chunks runs them (at most `batch` at once)."""
    full, rest = divmod(n_chunks, batch)
    parts = ([f"{full}x{batch}"] if full else []) + ([f"1x{rest}"] if rest else [])
    return " + ".join(parts)


def prefill_and_decode(model: Transformer, spec: dict, method: str, inputs, chunk_size: int) -> dict:
    """One run: prefill (timed), then spec['decode_tokens'] greedy tokens (timed separately)."""
    header, context, question, strength = inputs
    device = header.device
    sync(device)
    t0 = time.perf_counter()
    if method == "full":
        cache, logits, next_pos = run_full(model, torch.cat([header, context, question]))
        bounds, scores, kept = None, None, []
    else:
        cfg = method_config(method, chunk_size, spec["chunk_batch"])
        cfg.validate(model.args)
        cache, logits, next_pos, info = run_parallelcomp(model, header, context, question, cfg, strength)
        bounds, scores, kept = info["bounds"], info["scores"], info["kept"]
    sync(device)
    prefill_s = time.perf_counter() - t0
    cache_tokens = cache.length  # tokens per KV head after prefill (ParallelComp: kept chunks, evicted)
    cache_bytes = sum(2 * cache.keys(i).numel() * cache.keys(i).element_size() for i in range(len(cache.k)))
    t1 = time.perf_counter()
    decode(model, cache, logits, next_pos, spec["decode_tokens"] + 1, stop_ids=set())  # first token: no forward
    sync(device)
    return {"prefill_s": prefill_s, "decode_s": time.perf_counter() - t1, "cache_tokens": cache_tokens,
            "cache_bytes": cache_bytes, "logits": logits, "bounds": bounds, "scores": scores, "kept": kept}


def measure(model: Transformer, spec: dict, method: str, n_tokens: int, out_path: str | None = None) -> dict:
    """Prefill, then decode spec['decode_tokens'] tokens; times, peak memory and the FLOP count. With
    spec['warmup'] == 'same' the identical run goes first, untimed (GPU: kernel choice, library heuristics
    and allocator growth at these shapes happen there)."""
    args, device = model.args, next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = make_inputs(args, n_tokens, device, spec["seed"])
    chunk_size = default_chunk_size(args, len(inputs[0]), len(inputs[2]), spec["decode_tokens"])
    release(device)
    if spec["warmup"] == "same":
        prefill_and_decode(model, spec, method, inputs, chunk_size)
    rate = matmul_rate(device, dtype)
    load = os.getloadavg()[0]  # other processes on the machine slow CPU timings: recorded with each row
    baseline = reset_peak(device)
    run = prefill_and_decode(model, spec, method, inputs, chunk_size)
    peak, reserved = peak_bytes(device)
    rate = max(rate, matmul_rate(device, dtype))  # before and after: on a shared machine one probe can land
    # in a busy moment; the higher is the fairer ceiling
    bounds = run["bounds"]
    flops = prefill_flops(args, method, n_tokens, bounds, run["cache_tokens"] - len(inputs[2]))
    if out_path:
        saved = {"logits": run["logits"].float().cpu().contiguous()}
        if run["scores"] is not None:
            saved["scores"] = run["scores"].float().cpu().contiguous()
        save_file(saved, out_path)
    batch = 1 if method == "full" else method_config(method, chunk_size, spec["chunk_batch"]).chunk_batch
    row = {"tokens": n_tokens, "method": method, "measured": True, "prefill_s": run["prefill_s"],
           "decode_ms_per_token": 1000 * run["decode_s"] / spec["decode_tokens"], "peak_mib": peak / 2**20,
           "baseline_mib": baseline / 2**20, "cache_mib": run["cache_bytes"] / 2**20,
           "cache_tokens": run["cache_tokens"], "chunks": len(bounds) if bounds else 0,
           "chunks_per_forward": chunks_per_forward(len(bounds), batch) if bounds else "",
           "chunk_size": chunk_size, "kept": " ".join(map(str, run["kept"])), "prefill_tflop": flops / 1e12,
           "achieved_gflops": flops / run["prefill_s"] / 1e9, "matmul_gflops": rate / 1e9,
           "of_matmul": flops / run["prefill_s"] / rate, "argmax": int(run["logits"].argmax()), "load_avg": load,
           "warmup": spec["warmup"]}
    if reserved is not None:
        row["reserved_mib"] = reserved / 2**20
    return row


def warm_up(model: Transformer, spec: dict) -> None:
    """A small batched forward first, so one-time setup (oneDNN primitives, cuBLAS handles) is not timed."""
    device = next(model.parameters()).device
    n = min(1024, model.args.trained_window)
    tokens = torch.randint(3, model.args.vocab_size, (2, n), device=device)
    with torch.inference_mode():
        model(tokens, torch.arange(n, device=device).expand(2, -1), logits_at=torch.zeros(2, 1, dtype=torch.long,
                                                                                        device=device))
    sync(device)


def worker(spec: dict) -> None:
    """--worker: one measurement in this fresh process (clean RSS peak); prints one JSON line."""
    torch.set_num_threads(spec["threads"])
    with sdpa_only(spec["sdpa"]):
        model = build_model(spec)
        warm_up(model, spec)
        row = measure(model, spec, spec["method"], spec["tokens"], spec.get("logits_path"))
    print("RESULT " + json.dumps(row))


# ----------------------------------------------------------------------------------------------------
# The sweep

def run_isolated(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"tokens": spec["tokens"], "method": spec["method"], "measured": False, "note": f"failed: {err}",
                "error": proc.stderr.strip()}
    return json.loads(lines[-1][len("RESULT "):])


METHOD_CODES = ("full", "one", "many", "one+kv", "many+kv")


def methods_for(chunk_batch: int, codes=METHOD_CODES) -> list[str]:
    """Display names, in the order they run: 'many' -> 'pc b=8' for --chunk-batch 8, '+kv' -> ' +kv'."""
    names = {"full": "full", "one": "pc b=1", "many": f"pc b={chunk_batch}"}
    return [names[c.split("+")[0]] + (" +kv" if c.endswith("+kv") else "") for c in METHOD_CODES if c in codes]


def failed_row(n: int, method: str, error: BaseException) -> dict:
    """A row that raised: the error's type and first line in the table, the traceback in the log."""
    if isinstance(error, torch.OutOfMemoryError):
        note = "failed: out of memory"
    else:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        note = f"failed: {type(error).__name__}: {first}"
    return {"tokens": n, "method": method, "measured": False, "note": note,
            "error": "".join(traceback.format_exception(error)).strip()}


def sweep(spec: dict, lengths: list[int], full_max: int | None, isolate: bool, out: str, log) -> list[dict]:
    rows, model = [], None
    if not isolate:
        model = build_model(spec)
        warm_up(model, spec)
    with tempfile.TemporaryDirectory() as tmp:
        for n in lengths:
            outputs = {}
            for method in methods_for(spec["chunk_batch"], spec["methods"]):
                if method == "full" and full_max is not None and n > full_max:
                    rows.append({"tokens": n, "method": method, "measured": False,
                                 "note": f"skipped: above --full-max {full_max}"})
                    continue
                path = os.path.join(tmp, f"{n}-{len(rows)}.safetensors")
                t0 = time.perf_counter()
                try:
                    row = (run_isolated({**spec, "method": method, "tokens": n, "logits_path": path}) if isolate
                           else measure(model, spec, method, n, path))
                except Exception as e:  # noqa: BLE001 - one failing row (OOM, a backend error) must not end the sweep
                    row = failed_row(n, method, e)
                if row["measured"]:
                    outputs[method] = load_file(path)
                elif model is not None:
                    release(next(model.parameters()).device)  # outside the except block: the traceback
                    # no longer pins the failed row's tensors
                rows.append(row)
                write_csv(rows, os.path.join(out, "results.csv"))  # partial results survive a timeout
                log(f"{n:>7} {method:<13} " + (f"prefill {row['prefill_s']:8.2f} s  decode "
                    f"{row['decode_ms_per_token']:7.1f} ms/tok  peak {row['peak_mib']:8.0f} MiB"
                    + (f" (reserved {row['reserved_mib']:.0f})" if "reserved_mib" in row else "")
                    + f"  {100 * row['of_matmul']:5.1f}% of matmul"
                    + (f"  chunks per forward {row['chunks_per_forward']}" if row["chunks_per_forward"] else "")
                    if row["measured"] else row["note"]) + f"  [{time.perf_counter() - t0:.0f} s wall]")
                if row.get("error"):
                    log(row.pop("error"))
            compare_outputs(rows, n, outputs, spec["chunk_batch"], spec["dtype"])
    return rows


# "Equal output" of b=B against b=1: the same kept chunks and final logits within this fraction of their
# largest magnitude. float32: rounding only (seen: at most 1e-6 absolute on CPU). Half precision: GEMMs over B
# chunks block their sums differently from one chunk's, and every layer rounds to 8 (bf16) or 11 (fp16)
# mantissa bits; 3% (bf16) is what model.attention's two branches differ by on a tiny random model (1.4% seen).
# Random weights make chunk scores near-tied, so the kept chunks may differ legitimately: the score gap at the
# keep boundary (b=1's k-th and (k+1)-th lowest I_c) is recorded next to the largest score difference.
LOGIT_TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 1e-2}


def compare_outputs(rows: list[dict], n: int, outputs: dict, chunk_batch: int, dtype: str) -> None:
    """'Equal output': b=B against b=1 with the same eviction setting, stored on the b=B row: same kept
    chunks, max |logit difference| (and its tolerance), the chunk scores' largest difference against their
    gap at the keep boundary, and a verdict: 'yes', 'near tie' (kept chunks differ, but by less than the
    scores' own noise) or 'no'."""
    for kv in ("", " +kv"):
        one, many = f"pc b=1{kv}", f"pc b={chunk_batch}{kv}"
        if one in outputs and many in outputs and one != many:
            row = next(r for r in rows if r["tokens"] == n and r["method"] == many)
            ref = next(r for r in rows if r["tokens"] == n and r["method"] == one)
            a, b = outputs[one], outputs[many]
            scale = max(1.0, float(a["logits"].abs().max()))
            row["max_logit_diff_vs_b1"] = float((a["logits"] - b["logits"]).abs().max())
            row["logit_tolerance"] = LOGIT_TOLERANCE[dtype] * scale
            row["same_kept_as_b1"] = row["kept"] == ref["kept"]
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
    pts = [(r["tokens"], r["prefill_s"]) for r in rows if r["method"] == "full" and r["measured"]]
    if len(pts) < 2:
        return
    n = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    t = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    design = torch.stack([n, n * n], 1) / t[:, None]  # divide by t: fit relative error
    a, b = torch.linalg.lstsq(design, torch.ones_like(t)[:, None]).solution[:, 0].tolist()
    for r in rows:
        if r["method"] == "full" and not r["measured"] and r["note"].startswith("skipped"):
            r["prefill_s"], r["extrapolated"] = a * r["tokens"] + b * r["tokens"] ** 2, True
            r["note"] += f"; prefill time extrapolated from t = a*N + b*N^2 fitted to N = " \
                         f"{', '.join(str(p[0]) for p in pts)}"


# ----------------------------------------------------------------------------------------------------
# Reports: CSV, markdown, plots

COLUMNS = ["tokens", "method", "measured", "extrapolated", "prefill_s", "decode_ms_per_token", "peak_mib",
           "reserved_mib", "baseline_mib", "cache_mib", "cache_tokens", "chunks", "chunks_per_forward", "chunk_size",
           "kept", "prefill_tflop", "achieved_gflops", "matmul_gflops", "of_matmul", "load_avg", "warmup", "argmax",
           "equal_output", "same_kept_as_b1", "max_logit_diff_vs_b1", "logit_tolerance", "score_gap_at_keep",
           "max_score_diff_vs_b1", "note"]


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in COLUMNS})


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def table(rows: list[dict], lengths: list[int], methods: list[str], cell) -> list[str]:
    out = ["| tokens | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for n in lengths:
        cells = []
        for m in methods:
            r = next((r for r in rows if r["tokens"] == n and r["method"] == m), None)
            cells.append("" if r is None else cell(r))
        out.append(f"| {fmt_len(n)} | " + " | ".join(cells) + " |")
    return out


def get(rows, n, m):
    return next((r for r in rows if r["tokens"] == n and r["method"] == m and "prefill_s" in r), None)


GB80_MIB = 80e9 / 2**20  # "fits in 80 GB": 80 * 10^9 bytes = 76,294 MiB
PAPER_TABLE7 = (1317.72, 56.07)  # s: Llama-2-7B-chat, NarrativeQA, one MI210: 1 chunk vs 23 chunks + compression


def markdown(rows: list[dict], spec: dict, lengths: list[int], title: str, machine: list[str] = ()) -> str:
    methods = methods_for(spec["chunk_batch"], spec["methods"])
    many, device, cuda = f"pc b={spec['chunk_batch']}", spec["device"], spec["device"] == "cuda"
    lines = [f"### {title}", ""] + [f"    {m}" for m in machine] + ([""] if machine else [])
    measured = [r for r in rows if r["measured"]]
    if not measured:
        return "\n".join(lines + ["No row was measured:", ""] + [f"- {fmt_len(r['tokens'])} {r['method']}: "
                                                                  f"{r['note']}" for r in rows]) + "\n"
    first = measured[0]

    def secs(r):
        if "prefill_s" not in r:
            return "skipped" if r["note"].startswith("skipped") else "failed"
        full = get(rows, r["tokens"], "full")
        s = f"{r['prefill_s']:.2f}" + ("*" if r.get("extrapolated") else "")
        if r["method"] != "full" and full:
            s += f" ({full['prefill_s'] / r['prefill_s']:.1f}x{'*' if full.get('extrapolated') else ''})"
        return s

    def memory(r):
        if not r["measured"]:
            return "-"
        reserved = f" / {r['reserved_mib']:.0f}" if "reserved_mib" in r else ""
        return f"{r['peak_mib']:.0f}{reserved} ({r['peak_mib'] - r['baseline_mib']:+.0f})"

    warmup = ("each measurement ran once untimed on the same input first" if spec["warmup"] == "same" else
              "one small forward warmed up each process")
    lines += [f"Chunk size {first['chunk_size']} tokens, keep {KEEP_CHUNKS} chunks, KV capacity "
              f"{first['chunk_size'] // 2} (+kv), question {QUESTION_TOKENS} tokens, {spec['decode_tokens']} decoded "
              f"tokens, {spec['dtype']} on {device}" + (f" with {spec['threads']} threads" if device == "cpu" else "")
              + f"; {warmup}.", "",
              "**Prefill seconds** (speedup over full attention; * = extrapolated, not measured)", ""]
    lines += table(rows, lengths, methods, secs)
    mem = ("peak GPU memory allocated / reserved" if cuda else "peak process RSS")
    lines += ["", f"**Peak memory, MiB**: {mem} (in brackets: the peak above the weights-loaded baseline)", ""]
    lines += table(rows, lengths, methods, memory)
    lines += ["", "**Decode ms/token** (cache in MiB after prefill)", ""]
    lines += table(rows, lengths, methods, lambda r: f"{r['decode_ms_per_token']:.1f} ({r['cache_mib']:.0f})"
                   if r["measured"] else "-")
    lines += ["", "**Prefill throughput**: counted TFLOP / achieved GFLOP/s (% of the matmul rate "
              "measured in the same process just before and after, the higher)", ""]
    lines += table(rows, lengths, methods, lambda r: f"{r['prefill_tflop']:.2f} / {r['achieved_gflops']:.0f} "
                   f"({100 * r['of_matmul']:.0f}%)" if r["measured"] else "-")
    pc = [m for m in methods if m != "full"]
    if pc:
        lines += ["", "**Chunks per forward** as run (forwards x chunks in each; b=B runs at most B at once, "
                  "and there may be fewer chunks than that)", ""]
        lines += table(rows, lengths, pc, lambda r: r.get("chunks_per_forward") or "-")
    if many != "pc b=1" and any(m.startswith(many) for m in methods):
        tol = LOGIT_TOLERANCE[spec["dtype"]]
        lines += ["", f"**Many vs one chunk per forward** ({many} against pc b=1): equal output = the same kept "
                  f"chunks and max |logit difference| within {tol:g} x max(1, max |logit|) ({spec['dtype']}); "
                  "'near tie' = the kept chunks differ and the chunk scores moved by at least half their gap "
                  "at the keep boundary (random weights give near-tied scores)", "",
                  "| tokens | b=1 / b=B time | equal output: logit diff (tolerance); score diff (gap at keep) "
                  "| b=1 / b=B time (+kv) | equal output (+kv) |", "|---:|---:|---|---:|---|"]
        for n in lengths:
            cells = []
            for kv in ("", " +kv"):
                one, mb = get(rows, n, "pc b=1" + kv), get(rows, n, many + kv)
                if one and mb and mb["measured"] and one["measured"] and "equal_output" in mb:
                    cells += [f"{one['prefill_s'] / mb['prefill_s']:.2f}x",
                              f"{mb['equal_output']}: {mb['max_logit_diff_vs_b1']:.1e} ({mb['logit_tolerance']:.1e}); "
                              f"{mb['max_score_diff_vs_b1']:.1e} ({mb['score_gap_at_keep']:.1e})"]
                else:
                    cells += ["-", "-"]
            lines.append(f"| {fmt_len(n)} | " + " | ".join(cells) + " |")
    table7 = []
    for n in lengths:
        one, mb = get(rows, n, "pc b=1"), get(rows, n, many + " +kv")
        if one and mb and one["measured"] and mb["measured"] and many != "pc b=1":
            table7.append(f"{fmt_len(n)}: {one['prefill_s']:.2f} s vs {mb['prefill_s']:.2f} s "
                          f"({mb['chunks_per_forward']} chunks), {one['prefill_s'] / mb['prefill_s']:.2f}x")
    if table7:
        lines += ["", f"**Table 7 line**: prefill with 1 chunk in flight and no compression (pc b=1) against "
                  f"{spec['chunk_batch']} chunks per forward with compression ({many} +kv): " + "; ".join(table7)
                  + f". The paper's Table 7 (Llama-2-7B-chat, NarrativeQA, one AMD MI210 64 GB, 23 chunks): "
                  f"{PAPER_TABLE7[0]} s vs {PAPER_TABLE7[1]} s, {PAPER_TABLE7[0] / PAPER_TABLE7[1]:.2f}x."]
    if cuda:
        def fits(r):
            if not r["measured"]:
                return "-"
            alloc, res = r["peak_mib"], r.get("reserved_mib", r["peak_mib"])
            verdict = "yes" if res <= GB80_MIB else ("allocated yes, reserved no" if alloc <= GB80_MIB else "no")
            return f"{verdict} ({alloc / 1024:.1f} / {res / 1024:.1f} GiB)"
        lines += ["", "**Fits in 80 GB?** (peak allocated / reserved against 80 x 10^9 bytes = 76,294 MiB; the "
                  "CUDA context, about 0.5 GiB, is not in torch's counts)", ""]
        lines += table(rows, lengths, methods, fits)
    ref, top = (16384 if 16384 in lengths else lengths[0]), lengths[-1]
    growth = []
    for m in methods:
        lo, hi = get(rows, ref, m), get(rows, top, m)
        if top > ref and lo and hi and lo["measured"] and hi["measured"]:
            above = (hi["peak_mib"] - hi["baseline_mib"]) / max(lo["peak_mib"] - lo["baseline_mib"], 1)
            growth.append(f"{m} {hi['peak_mib'] / lo['peak_mib']:.2f}x (above baseline: {above:.2f}x)")
    if growth:
        lines += ["", f"**Peak memory at {fmt_len(top)} over {fmt_len(ref)}**: " + "; ".join(growth) + "."]
    failed = [f"{fmt_len(r['tokens'])} {r['method']}: {r['note']}" for r in rows
              if r.get("note", "").startswith("failed")]
    if failed:
        lines += ["", "**Failed rows** (the traceback is in log.txt): " + "; ".join(failed) + "."]
    notes = sorted({r["note"] for r in rows if r.get("note") and not r["note"].startswith("failed")})
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], spec: dict, out: str, title: str) -> list[str]:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    for key, ylabel, fname in (("prefill_s", "prefill seconds", "prefill_time.png"),
                               ("peak_mib", "peak memory, MiB" + (" (GPU allocated)" if spec["device"] == "cuda"
                                                                 else " (process RSS)"), "peak_memory.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for m in methods_for(spec["chunk_batch"], spec["methods"]):
            color, marker = PLOT_STYLE.get(m.replace(f"b={spec['chunk_batch']}", "b=B"),
                                           (("tab:red", "D") if "kv" in m else ("tab:orange", "v")))
            pts = sorted((r["tokens"], r[key], r["measured"]) for r in rows if r["method"] == m and key in r)
            meas = [(n, v) for n, v, ok in pts if ok]
            if meas:
                ax.plot(*zip(*meas), color=color, marker=marker, label=m)
            extra = [(n, v) for n, v, ok in pts if not ok]
            if extra and meas:
                ax.plot(*zip(*([meas[-1]] + extra)), color=color, marker=marker, linestyle="--", fillstyle="none",
                        label=f"{m} (extrapolated)")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["tokens"] for r in rows})
        ax.set_xticks(ticks, [fmt_len(n) for n in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")  # (resets the formatters: set them after)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        ax.set_xlabel("input tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


# ----------------------------------------------------------------------------------------------------
# Main

def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return 0
    if (a.ckpt is None) == (a.shape is None):
        raise SystemExit("error: give --ckpt DIR or --shape NAME (one of them)")
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA GPU")
    dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    lengths = sorted(int(x) for x in a.lengths.split(","))
    methods = [m.strip() for m in a.methods.split(",")]
    if not set(methods) <= set(METHOD_CODES):
        raise SystemExit(f"error: --methods takes {', '.join(METHOD_CODES)}; got {a.methods!r}")
    sdpa = [b.strip() for b in a.sdpa.split(",")]
    if not sdpa or not set(sdpa) <= set(SDPA_BACKENDS):
        raise SystemExit(f"error: --sdpa takes a list of {', '.join(SDPA_BACKENDS)}; got {a.sdpa!r}")
    warmup = a.warmup if a.warmup != "auto" else ("same" if device == "cuda" else "small")
    spec = {"shape": a.shape, "ckpt": a.ckpt, "device": device, "dtype": dtype, "seed": a.seed,
            "threads": a.threads, "chunk_batch": a.chunk_batch, "decode_tokens": a.decode_tokens,
            "methods": methods, "sdpa": sdpa, "warmup": warmup}
    isolate = {"auto": device == "cpu", "yes": True, "no": False}[a.isolate]
    os.makedirs(a.out, exist_ok=True)
    if device == "cpu":
        torch.set_num_threads(a.threads)
    with open(os.path.join(a.out, "log.txt"), "w") as log_file:
        def log(msg):
            print(msg, flush=True)
            log_file.write(msg + "\n")
            log_file.flush()
        return run_sweep(a, spec, lengths, isolate, log)


def run_sweep(a: argparse.Namespace, spec: dict, lengths: list[int], isolate: bool, log) -> int:
    device, dtype = spec["device"], spec["dtype"]
    name = a.shape or os.path.basename(os.path.normpath(a.ckpt))
    args = ModelArgs(**SHAPES[a.shape]) if a.shape else load_args(a.ckpt)
    params = n_params(args)
    title = (f"{name} ({params / 1e6:.{0 if params > 1e7 else 2}f}M params"
             f"{', random weights' if a.shape else ''}), {dtype}, {device}"
             + (f", {a.threads} threads" if device == "cpu" else f" ({torch.cuda.get_device_name()})"))
    log(f"# {title}; lengths {lengths}; chunk batch {a.chunk_batch}; "
        f"{'each measurement in a fresh process' if isolate else 'one process'}; warm-up {spec['warmup']}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    with sdpa_only(spec["sdpa"]):
        machine = machine_lines(args, torch.device(device), getattr(torch, dtype), spec["sdpa"])
        for line in machine:
            log(line)
        rows = sweep(spec, lengths, a.full_max, isolate, a.out, log)
    extrapolate_full(rows)
    write_csv(rows, os.path.join(a.out, "results.csv"))
    md = markdown(rows, spec, lengths, title, machine)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    files = []
    if not a.no_plots and any(r["measured"] for r in rows):
        try:
            files = plots(rows, spec, a.out, title)
        except ImportError:
            log("plots skipped: matplotlib is not installed (pip install -r bench/requirements.txt)")
    log(md)
    log(f"load average at the end {os.getloadavg()[0]:.1f}")
    log(f"wrote {', '.join(['results.csv', 'results.md', 'log.txt'] + files)} to {a.out} "
        f"in {time.perf_counter() - t0:.0f} s")
    return 0


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
    p.add_argument("--methods", default=",".join(METHOD_CODES),
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
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement, spec as JSON
    return p


if __name__ == "__main__":
    sys.exit(main())
