"""A from-scratch Llama-family decoder in plain PyTorch, loaded from a Hugging Face checkpoint folder.

Covers Llama 2, Llama 3, Llama 3.1/3.2 (llama3 RoPE scaling), Mistral and Qwen2/Qwen2.5 (q/k/v bias).
It follows the Hugging Face `transformers` Llama numerics exactly (RMSNorm in float32, rotate-half RoPE
computed in float32), so its float32 logits match `transformers` to ~1e-5.

Two things matter for ParallelComp and are first-class here:
  * RoPE is applied at caller-given position ids, so every chunk can reuse positions 0..n-1;
  * the KV cache is an object the caller passes in. `KVCache.update` sees each layer's queries, keys and
    values before attention and returns the keys/values to attend to, which is where ParallelComp's KV
    eviction and attention calibration plug in (see parallelcomp.py). The cache stays at n_kv_heads.

Golden-reference entry point:  model = load_model(dir); logits = model(tokens, positions)  # [B, T, vocab]
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

try:  # optional: used per chunk on CUDA in half precision; SDPA is the exact fallback everywhere else
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says what is wrong and what to do."""


# ----------------------------------------------------------------------------------------------------
# Configuration

SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...} or None
    max_position_embeddings: int = 4096  # the window the model was trained on (see trained_window)
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama's `attention_bias` puts a bias on all four projections
    mlp_bias: bool = False
    model_type: str = "llama"
    sliding_window: int | None = None  # Mistral v0.1: keys further back than this are not attended

    @property
    def trained_window(self) -> int:
        """Tokens the model was pre-trained on: the pre-scaling window for Llama 3.1-style checkpoints.

        Capped at the sliding window where the checkpoint has one: this model always runs full attention,
        which equals sliding-window attention only while a sequence fits in the window."""
        orig = (self.rope_scaling or {}).get("original_max_position_embeddings")
        window = int(orig or self.max_position_embeddings)
        return min(window, self.sliding_window) if self.sliding_window else window

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        """Fill from a Hugging Face config.json dict (old `rope_theta`/`rope_scaling` or new `rope_parameters`)."""
        mtype = cfg.get("model_type")
        if mtype not in SUPPORTED:
            raise CheckpointError(f"model_type {mtype!r} is not supported; this tool runs "
                                  f"{', '.join(SUPPORTED)} checkpoints ({', '.join(SUPPORTED.values())})")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"rope_parameters / rope_scaling must be a JSON object, got {rope!r}")
        rope = dict(rope)
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))  # old configs spell it "type"
        if rope_type not in ("default", "llama3", "linear"):
            raise CheckpointError(f"RoPE type {rope_type!r} is not supported (supported: default, llama3, linear)")
        try:
            dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            bias = bool(cfg.get("attention_bias", False))
            # Mistral always slides; Qwen2 carries a sliding_window it only uses with use_sliding_window
            sliding = cfg.get("sliding_window") if mtype == "mistral" or cfg.get("use_sliding_window") else None
            return cls(
                dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=int(cfg.get("head_dim") or dim // n_heads),
                hidden_dim=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=rope_theta,
                rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bias or mtype == "qwen2", o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
                model_type=mtype, sliding_window=int(sliding) if sliding else None)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"a required field is missing or malformed ({e!r})") from None


# ----------------------------------------------------------------------------------------------------
# Rotary position embedding (one convention: HF checkpoints store q/k for the rotate-half layout)

def llama3_scale_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, short ones kept, smooth between."""
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, out)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, float32, with the checkpoint's scaling applied."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim))
    scaling = args.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        inv_freq = llama3_scale_inv_freq(inv_freq, scaling)
    elif scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for arbitrary positions [B, T] -> two [B, 1, T, head_dim] tensors, computed in float32."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, H, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------------------------------
# Attention: one function, two backends

def causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """Bottom-right aligned causal mask [t_q, t_k]: query i sits at key position i + (t_k - t_q)."""
    i = torch.arange(t_q, device=device)[:, None]
    j = torch.arange(t_k, device=device)[None, :]
    return j <= i + (t_k - t_q)


def use_flash(q: torch.Tensor) -> bool:
    """flash-attn runs on CUDA in half precision only; SDPA is the exact fallback everywhere else."""
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal scaled dot-product attention with GQA and bottom-right causal alignment.

    q: [B, H, Tq, hd]; k, v: [B, Hkv, Tk, hd] with Tk >= Tq (the queries are the last Tq positions).
    Several independent chunks go in one call as the batch dimension B; right-padded chunks are exact
    for their real tokens, since a real query never sees a later (padding) key under the causal mask.
    Returns [B, H, Tq, hd]."""
    if use_flash(q):  # flash-attn takes [B, T, H, hd], aligns causal=True bottom-right and handles GQA itself
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    t_q, t_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if t_q == 1:  # one query (a decode step) sees every key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # SDPA's is_causal is top-left aligned, wrong when Tq < Tk: give the bottom-right mask explicitly
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t_q, t_k, q.device), enable_gqa=gqa)


class CacheHook(Protocol):
    """What a forward pass calls in every layer, before attention: `update(layer, q, k, v)` receives the layer's
    rotated queries [B, H, T, hd] and new keys/values [B, Hkv, T, hd] and returns the keys and values the queries
    attend to ([B, Hkv, S, hd], the new tokens last). KVCache appends and returns everything so far; ParallelComp
    plugs in here (parallelcomp.ChunkPrefill, QuestionOverChunk, Calibration)."""

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class KVCache:
    """Plain per-layer KV cache at n_kv_heads (a CacheHook): appends and returns everything cached so far. Buffers
    keep room for `grow` more tokens, so a decoding step writes in place instead of copying the whole cache (17 GB
    per token for Llama-3-8B at 128K); `keys(layer)` / `values(layer)` are the filled part."""

    def __init__(self, n_layers: int, grow: int = 256):
        self.k: list[torch.Tensor | None] = [None] * n_layers  # buffers (B, Hkv, capacity, hd)
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.size = [0] * n_layers
        self.grow = grow

    def keys(self, layer: int) -> torch.Tensor:
        return self.k[layer][:, :, :self.size[layer]]  # (B, Hkv, S, hd)

    def values(self, layer: int) -> torch.Tensor:
        return self.v[layer][:, :, :self.size[layer]]

    def replace(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Set a layer's whole cache (no spare room: the next append reallocates once)."""
        self.k[layer], self.v[layer], self.size[layer] = k, v, k.shape[2]

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        n, t = self.size[layer], k.shape[2]
        if self.k[layer] is None:
            self.replace(layer, k, v)
            return k, v
        if n + t > self.k[layer].shape[2]:  # out of room: reallocate with `grow` tokens to spare
            spare = lambda buf: buf.new_empty(*buf.shape[:2], t + self.grow, buf.shape[3])  # noqa: E731
            self.k[layer] = torch.cat([self.keys(layer), spare(self.k[layer])], dim=2)
            self.v[layer] = torch.cat([self.values(layer), spare(self.v[layer])], dim=2)
        self.k[layer][:, :, n:n + t] = k
        self.v[layer][:, :, n:n + t] = v
        self.size[layer] = n + t
        return self.keys(layer), self.values(layer)

    @property
    def length(self) -> int:
        return self.size[0]


# ----------------------------------------------------------------------------------------------------
# The model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)

    def forward(self, x, cos, sin, cache: CacheHook | None):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, q, k, v)  # (B, Hkv, S, hd), S >= T
        y = attention(q, k, v)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)  # gate
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)  # up
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, cache):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: CacheHook | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions: LongTensor [B, T]. Returns float32 logits [B, T, vocab], or [B, P, vocab]
        at the rows `logits_at` [B, P] only: the LM head never runs on a whole long prompt."""
        x = self.tok_embeddings(tokens)  # (B, T, dim)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        if logits_at is not None:
            x = torch.gather(x, 1, logits_at[..., None].expand(-1, -1, x.shape[-1]))  # (B, P, dim)
        return self.output(self.norm(x)).float()


# ----------------------------------------------------------------------------------------------------
# Loading a Hugging Face checkpoint folder (safetensors only: nothing is ever unpickled)

def hf_name_map(args: ModelArgs) -> dict[str, str]:
    """Checkpoint tensor name -> our parameter name, written out literally."""
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    if not args.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm.weight": "attention_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attention.wq.weight",
        "self_attn.k_proj.weight": "attention.wk.weight",
        "self_attn.v_proj.weight": "attention.wv.weight",
        "self_attn.o_proj.weight": "attention.wo.weight",
        "mlp.gate_proj.weight": "feed_forward.w1.weight",
        "mlp.up_proj.weight": "feed_forward.w3.weight",
        "mlp.down_proj.weight": "feed_forward.w2.weight",
    }
    if args.qkv_bias:
        per_layer.update({f"self_attn.{p}_proj.bias": f"attention.w{p}.bias" for p in "qkv"})
    if args.o_bias:
        per_layer["self_attn.o_proj.bias"] = "attention.wo.bias"
    if args.mlp_bias:
        per_layer.update({f"mlp.{a}_proj.bias": f"feed_forward.{b}.bias" for a, b in
                          (("gate", "w1"), ("up", "w3"), ("down", "w2"))})
    for i in range(args.n_layers):
        names.update({f"model.layers.{i}.{src}": f"layers.{i}.{dst}" for src, dst in per_layer.items()})
    return names


def read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download it")
    return data


def load_args(ckpt_dir: str) -> ModelArgs:
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint folder {ckpt_dir!r} does not exist or is not a folder")
    path = os.path.join(ckpt_dir, "config.json")
    cfg = read_json(path, "a checkpoint folder holds config.json, *.safetensors and tokenizer files")
    try:
        return ModelArgs.from_config(cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def weight_files(ckpt_dir: str) -> list[str]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'; re-download it")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not os.path.exists(os.path.join(ckpt_dir, f)):
                raise CheckpointError(f"shard {f} listed in {index} is missing; download it into {ckpt_dir}")
        return [os.path.join(ckpt_dir, f) for f in files]
    single = os.path.join(ckpt_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    if any(f.endswith((".bin", ".pth", ".pt")) for f in os.listdir(ckpt_dir)):
        raise CheckpointError(f"{ckpt_dir} has only pickled weights (.bin/.pth); this tool reads *.safetensors "
                              "only: download the safetensors files of this model")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {ckpt_dir}; download the "
                          "model's *.safetensors files (and their index, if sharded) into it")


def load_model(ckpt_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Build the model from a checkpoint folder: meta-device construction, then each tensor is read once,
    checked against the expected name and shape, and assigned (strict: nothing missing, nothing extra)."""
    args = load_args(ckpt_dir)
    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    names = hf_name_map(args)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(ckpt_dir):
        fname = os.path.basename(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq") or (args.tie_embeddings and key == "lm_head.weight"):
                        continue  # derived from config.json / tied to the embedding
                    if key not in names:
                        raise CheckpointError(f"{fname}: unexpected tensor {key!r}; is this the checkpoint "
                                              f"config.json describes ({args.model_type}, {args.n_layers} layers)?")
                    tensor = f.get_tensor(key)
                    want = tuple(expected[names[key]].shape)
                    if tuple(tensor.shape) != want:
                        raise CheckpointError(f"{fname}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                              f"config.json implies {want}")
                    state[names[key]] = tensor.to(device=device, dtype=dtype)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{fname} cannot be read ({reason}); it is damaged or "
                                  "truncated: re-download it") from None
    missing = sorted(set(names) - {k for k in names if names[k] in state})
    if missing:
        raise CheckpointError(f"{len(missing)} tensors missing from {ckpt_dir}, e.g. {missing[0]!r}; "
                              "the download is incomplete")
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_embeddings:  # assign=True made two Parameters; tie them back into one
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(args).to(device)
    return model.eval()
