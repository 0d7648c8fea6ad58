"""model.attention's flash-attn branch, run here on CPU (and on CUDA where there is one) through a pure-PyTorch
stand-in for `flash_attn.flash_attn_func` that follows flash-attn 2's documented contract:

  * q [B, Tq, H, D], k and v [B, Tk, Hkv, D] (sequence before heads, the transpose of our [B, H, T, D]);
  * H divisible by Hkv; query head h reads KV head h // (H // Hkv) (heads 0, 1, 2 of 6 read KV head 0 of 2);
  * causal=True aligned bottom-right when Tq != Tk (flash-attn >= 2.1): query i sees keys j <= i + Tk - Tq,
    and a query row that sees no key gives zeros;
  * softmax_scale defaults to 1 / sqrt(D); the output is [B, Tq, H, D] in the input dtype.

The real package is not needed: a wrong argument layout, a top-left causal alignment or a wrong GQA grouping
in model.attention's flash-attn call fails here, against an independent float64 masked softmax and against the whole
model's SDPA path. Where CUDA is available the same checks run on it in bfloat16 (bench/gpu.sh does that);
where the flash_attn package is installed too, the real kernel is checked the same way.
"""
import math

import pytest
import torch

import model as M
from conftest import make_checkpoint, qkv, reference_attention
from parallelcomp import ParallelCompConfig, decode, run_parallelcomp

CUDA = torch.cuda.is_available()


def flash_attn_func_reference(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's flash_attn_func, forward only, in plain PyTorch (float32 accumulation, like the kernel)."""
    assert dropout_p == 0.0 and window_size == (-1, -1) and softcap == 0.0 and alibi_slopes is None
    assert not return_attn_probs  # features this project does not use: passing one is a mistake here
    assert q.dim() == k.dim() == v.dim() == 4, "flash_attn_func takes [B, T, H, D] tensors"
    b, t_q, h, d = q.shape
    assert k.shape == v.shape and k.shape[0] == b and k.shape[3] == d, (q.shape, k.shape, v.shape)
    t_k, h_kv = k.shape[1], k.shape[2]
    assert h % h_kv == 0, f"{h} query heads are not divisible by {h_kv} KV heads (layout [B, T, H, D]?)"
    assert q.dtype == k.dtype == v.dtype and q.device == k.device == v.device and d <= 256
    scale = 1 / math.sqrt(d) if softmax_scale is None else softmax_scale
    group = h // h_kv
    kv_head = torch.arange(h, device=q.device) // group  # query head h reads KV head h // group
    qf = q.float().transpose(1, 2)  # (B, H, Tq, D)
    kf, vf = k.float().transpose(1, 2)[:, kv_head], v.float().transpose(1, 2)[:, kv_head]  # (B, H, Tk, D)
    scores = qf @ kf.transpose(-1, -2) * scale  # (B, H, Tq, Tk)
    if causal:
        i = torch.arange(t_q, device=q.device)[:, None]
        j = torch.arange(t_k, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (t_k - t_q), float("-inf"))  # bottom-right aligned
    probs = scores.softmax(-1).nan_to_num(0.0)  # a row with no visible key: zeros, as the kernel returns
    return (probs @ vf).transpose(1, 2).to(q.dtype)  # (B, Tq, H, D)


@pytest.fixture
def flash(monkeypatch, request):
    """Forces model.attention onto its flash-attn branch with the given implementation; counts the calls."""
    impl = getattr(request, "param", "reference")
    if impl == "flash_attn":
        func = pytest.importorskip("flash_attn").flash_attn_func
        if not CUDA:
            pytest.skip("the flash_attn kernel needs CUDA")
    else:
        func = flash_attn_func_reference
    calls = []

    def counted(q, k, v, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), kw))
        return func(q, k, v, **kw)
    monkeypatch.setattr(M, "flash_attn_func", counted)
    monkeypatch.setattr(M, "use_flash", lambda q: True)
    return calls


DEVICES = [pytest.param("cpu", torch.float32, 1e-5, id="cpu-fp32"),
           pytest.param("cpu", torch.bfloat16, 2e-2, id="cpu-bf16"),
           pytest.param("cuda", torch.bfloat16, 2e-2, id="cuda-bf16",
                        marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]
SHAPES = pytest.mark.parametrize("t_q, t_k", [(9, 9), (4, 11), (1, 11), (1, 1)],
                                 ids=["square", "fewer_queries", "one_query", "one_token"])
HEADS = pytest.mark.parametrize("h, h_kv", [(4, 4), (6, 2), (8, 1)], ids=["mha", "gqa", "mqa"])


# ----------------------------------------------------------------------------------------------------
# The stand-in itself follows the documented contract

def test_reference_follows_the_documented_examples():
    """flash-attn's docstring: seqlen_q 2, seqlen_k 5 keeps [[1 1 1 1 0], [1 1 1 1 1]]; seqlen_q 5, seqlen_k 2
    keeps [[0 0], [0 0], [0 0], [1 0], [1 1]] and all-masked rows give zeros; 6 query heads over 2 KV heads:
    heads 0-2 read KV head 0, heads 3-5 read KV head 1."""
    # one-hot values and equal scores: output row i = mean of the visible keys' one-hot vectors
    for t_q, t_k, keep in [(2, 5, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
                           (5, 2, [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]])]:
        q, k = torch.zeros(1, t_q, 1, t_k), torch.zeros(1, t_k, 1, t_k)
        v = torch.eye(t_k)[None, :, None, :]  # (1, Tk, 1, Tk): key j's value is e_j
        keep = torch.tensor(keep, dtype=torch.float32)
        want = keep / keep.sum(-1, keepdim=True).clamp(min=1)
        torch.testing.assert_close(flash_attn_func_reference(q, k, v, causal=True)[0, :, 0], want)
    # GQA grouping: KV head g's values are all g; query head h must read g = h // 3
    q, k = torch.randn(1, 3, 6, 8), torch.randn(1, 4, 2, 8)
    v = torch.arange(2.0)[None, None, :, None].expand(1, 4, 2, 8)
    got = flash_attn_func_reference(q, k, v, causal=True)[0, :, :, 0]  # (Tq, H)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0, 0, 1, 1, 1]] * 3))
    # default scale 1/sqrt(D)
    q, k, v = torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16)
    default, explicit = flash_attn_func_reference(q, k, v), flash_attn_func_reference(q, k, v, softmax_scale=0.25)
    torch.testing.assert_close(default, explicit)


def test_reference_rejects_our_own_layout():
    """Handing it [B, H, T, D] without the transpose trips the head-divisibility check for these shapes."""
    q, k, v = qkv(1, 8, 2, 5, 7)  # ours: [B, H, T, D]
    with pytest.raises(AssertionError):
        flash_attn_func_reference(q, k, v, causal=True)  # read as Tq=8, H=5, Tk=2, Hkv=7


# ----------------------------------------------------------------------------------------------------
# model.attention's flash branch against the float64 masked softmax

@pytest.mark.parametrize("device, dtype, atol", DEVICES)
@SHAPES
@HEADS
def test_flash_branch_matches_masked_softmax(flash, device, dtype, atol, t_q, t_k, h, h_kv):
    q, k, v = qkv(2, h, h_kv, t_q, t_k, seed=t_q * 100 + t_k + h_kv, dtype=dtype, device=device)
    got = M.attention(q, k, v)
    assert len(flash) == 1 and flash[0][0] == (2, t_q, h, 16) and flash[0][1] == (2, t_k, h_kv, 16)  # it ran
    assert got.shape == (2, h, t_q, 16) and got.dtype == dtype and got.device.type == device
    torch.testing.assert_close(got.double().cpu(), reference_attention(q, k, v), rtol=0, atol=atol)


@pytest.mark.parametrize("flash", ["flash_attn"], indirect=True)
@SHAPES
@HEADS
def test_real_flash_attn_kernel_matches_masked_softmax(flash, t_q, t_k, h, h_kv):
    """Only where the flash_attn package and CUDA are there (skipped otherwise): the real kernel, bfloat16."""
    q, k, v = qkv(2, h, h_kv, t_q, t_k, d=64, seed=t_q + t_k, dtype=torch.bfloat16, device="cuda")
    got = M.attention(q, k, v)
    assert len(flash) == 1
    torch.testing.assert_close(got.double().cpu(), reference_attention(q, k, v), rtol=0, atol=2e-2)


@pytest.mark.parametrize("device, dtype, atol", DEVICES[:1] + DEVICES[2:])
def test_flash_branch_equals_sdpa_branch(monkeypatch, device, dtype, atol):
    """The two branches of model.attention on the same inputs, every shape the model produces: chunk prefill
    (square), the question over a cache (fewer queries), a decode step (one query); MHA and GQA."""
    for (t_q, t_k), (h, h_kv) in [(s, hh) for s in [(33, 33), (16, 80), (1, 80)] for hh in [(4, 4), (8, 2)]]:
        q, k, v = qkv(3, h, h_kv, t_q, t_k, d=32, seed=t_q + h_kv, dtype=dtype, device=device)
        sdpa = M.attention(q, k, v)
        with monkeypatch.context() as m:
            m.setattr(M, "flash_attn_func", flash_attn_func_reference)
            m.setattr(M, "use_flash", lambda q: True)
            fl = M.attention(q, k, v)
        torch.testing.assert_close(fl.float(), sdpa.float(), rtol=0, atol=atol, msg=f"{t_q}x{t_k}, {h}/{h_kv} heads")


# ----------------------------------------------------------------------------------------------------
# The whole model: logits and ParallelComp's output with the flash branch forced equal the SDPA path

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama (GQA: 4 query heads over 2 KV heads, 256-token window) written by transformers."""
    return make_checkpoint(str(tmp_path_factory.mktemp("flash") / "ckpt"), random_vectors=True)


def run_model(path, device, dtype):
    """Full forward, incremental decoding (prefill, 1-token and 3-token steps) and ParallelComp end to end
    (right-padded chunk batches, KV eviction, the question over the assembled cache, greedy decoding)."""
    model = M.load_model(path, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 512, (2, 48), generator=g).to(device)
    positions = torch.arange(48, device=device).repeat(2, 1)
    out = {}
    with torch.inference_mode():
        out["full"] = model(tokens, positions)
        cache, parts = M.KVCache(model.args.n_layers), []
        for start, end in [(0, 30), (30, 31), (31, 32), (32, 35), (35, 48)]:
            parts.append(model(tokens[:, start:end], positions[:, start:end], cache=cache))
        out["incremental"] = torch.cat(parts, 1)
    context = torch.randint(3, 512, (650,), generator=g).to(device)
    strength = torch.zeros(650, dtype=torch.int8)
    strength[torch.randint(0, 650, (60,), generator=g)] = 1  # sentence ends: chunks of unequal length
    header, question = torch.tensor([1], device=device), torch.randint(3, 512, (12,), generator=g).to(device)
    cfg = ParallelCompConfig(chunk_size=100, keep_chunks=2, chunk_batch=3, kv_capacity=60)
    cache, logits, next_pos, info = run_parallelcomp(model, header, context, question, cfg, strength)
    out["question_logits"] = logits
    out["chunk_scores"] = info["scores"]
    out["kept"] = info["kept"]
    out["generated"] = decode(model, cache, logits, next_pos, 6, stop_ids=set())
    assert len(info["bounds"]) >= 7 and len({e - s for s, e in info["bounds"]}) > 1  # ragged, several batches
    return out


@pytest.mark.parametrize("device, dtype, atol", DEVICES)
def test_model_with_flash_branch_equals_sdpa_path(tiny_model_dir, monkeypatch, device, dtype, atol):
    sdpa = run_model(tiny_model_dir, device, dtype)
    calls = []
    with monkeypatch.context() as m:
        m.setattr(M, "flash_attn_func", lambda q, k, v, **kw: calls.append(q.shape) or
                  flash_attn_func_reference(q, k, v, **kw))
        m.setattr(M, "use_flash", lambda q: True)
        fl = run_model(tiny_model_dir, device, dtype)
    assert len(calls) >= 25 and {c[1] for c in calls} >= {1, 12, 30}  # every kind of call went through it
    for key in ("full", "incremental", "question_logits", "chunk_scores"):
        # bfloat16: 3% of the largest |value| (seen on CPU: 1.4% for logits of size 3.4, 0.03% for the scores);
        # a layout, alignment or grouping mistake moves them by their own size
        tol = 1e-4 if dtype == torch.float32 else 3e-2 * float(sdpa[key].abs().max())
        torch.testing.assert_close(fl[key].float(), sdpa[key].float(), rtol=0, atol=tol, msg=key)
    assert fl["kept"] == sdpa["kept"]  # the scores' gap at the keep boundary (0.12) is far above their noise
    if dtype == torch.float32:  # greedy tokens can flip on near-tied bfloat16 logits
        assert fl["generated"] == sdpa["generated"]

