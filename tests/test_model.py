"""model.py against Hugging Face `transformers`, and against itself.

Every checkpoint here is a random tiny model that `transformers` writes in the real Hugging Face layout
(`save_pretrained`, safetensors); nothing is downloaded. Sections, in the order data flows:
configuration and RoPE, attention, the forward pass against `transformers`, incremental decoding, loading.
"""
import json
import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

import model as M
from conftest import (edit_json, make_checkpoint, only_pickled_weights, qkv, read_json, reference_attention, rewrite_weights,
                      truncate_weights, write_json)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> make_checkpoint keywords. Defaults: hidden 64, 4 query heads, 2 KV heads (GQA), 2 layers, vocab 512.
# With head_dim 16 and original window 64 the llama3 scaling hits all three of its bands (kept, smoothed, /factor).
VARIANTS = {
    "llama_gqa": {},
    "llama31_rope": {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 512},
    "llama_tied": {"tie_word_embeddings": True},
    "llama_head_dim": {"head_dim": 32},  # != hidden_size / num_attention_heads = 16
    "llama_all_bias": {"attention_bias": True, "mlp_bias": True},
    "qwen2_qkv_bias": {"model_type": "qwen2"},
    "mistral": {"model_type": "mistral"},  # sliding_window 4096 > every sequence below
    "sharded": {"max_shard_size": "50KB"},
}
LONG = 1100  # tokens: longer than the 256-token max_position_embeddings the tiny checkpoints declare


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Lazily built checkpoint folders, one per VARIANTS entry (shared by the tests of this module)."""
    root, made = tmp_path_factory.mktemp("ckpts"), {}

    def get(name: str) -> str:
        if name not in made:
            made[name] = make_checkpoint(str(root / name), random_vectors=True, **VARIANTS[name])
        return made[name]
    return get


def hf_model(path: str):
    # eager attention: a plain matmul-softmax path, independent of the SDPA kernels our model uses
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def rand_tokens(b: int, t: int, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def config_dict(**over) -> dict:
    cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 256}
    cfg.update(over)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Configuration and RoPE

def test_old_and_new_rope_config_forms_parse_to_the_same_args(ckpts, tmp_path):
    """transformers 5 writes `rope_parameters`; older checkpoints carry `rope_theta` + `rope_scaling` with the
    type under `type` (Llama 3.1 as first released) or `rope_type`. All three must give the same ModelArgs."""
    src = ckpts("llama31_rope")
    new = read_json(src, "config.json")
    assert new["rope_parameters"]["rope_type"] == "llama3" and "rope_scaling" not in new  # really the new form
    new_args = M.load_args(src)
    assert new_args.rope_theta == 500000.0
    assert new_args.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}

    scaling = {k: v for k, v in new["rope_parameters"].items() if k not in ("rope_theta", "rope_type")}
    for type_key in ("type", "rope_type"):
        old = {k: v for k, v in new.items() if k != "rope_parameters"}
        old.update(rope_theta=500000.0, rope_scaling={type_key: "llama3", **scaling})
        folder = tmp_path / type_key
        shutil.copytree(src, folder)
        write_json(folder, "config.json", old)
        assert M.load_args(str(folder)) == new_args, type_key

    # default RoPE: new form {"rope_type": "default", "rope_theta": x} == old form rope_theta + rope_scaling null
    a = M.ModelArgs.from_config(config_dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    b = M.ModelArgs.from_config(config_dict(rope_theta=1e6, rope_scaling=None))
    assert a == b and a.rope_theta == 1e6 and a.rope_scaling is None


def test_head_dim_from_config_is_honoured(ckpts):
    model = M.load_model(ckpts("llama_head_dim"))
    assert model.args.head_dim == 32 and model.args.dim // model.args.n_heads == 16
    assert model.layers[0].attention.wq.weight.shape == (4 * 32, 64)
    assert model.inv_freq.shape == (16,)
    # without a head_dim key it is hidden_size / num_attention_heads
    assert M.ModelArgs.from_config(config_dict()).head_dim == 16


@pytest.mark.parametrize("head_dim, theta, original", [(128, 500000.0, 8192), (16, 10000.0, 64)])
def test_llama3_scale_inv_freq_matches_transformers(head_dim, theta, original):
    """Llama 3.1 frequency scaling against transformers' own llama3 RoPE init function."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                   max_position_embeddings=original * 16, rope_parameters=dict(rope))
    want, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert attention_factor == 1.0  # nothing for us to apply to cos/sin

    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    got = M.llama3_scale_inv_freq(base, {k: v for k, v in rope.items() if k != "rope_theta"})
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # the comparison covers all three bands: kept (high frequency), divided by factor, smoothed in between
    ratio = got / base
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(1 / 8)).any()
    assert ((ratio < 1 - 1e-6) & (ratio > 1 / 8 + 1e-6)).any()
    # and the model's own inverse frequencies go through it
    args = M.ModelArgs.from_config(config_dict(hidden_size=head_dim * 4, head_dim=head_dim, rope_parameters=rope))
    torch.testing.assert_close(M.rope_inv_freq(args), want, rtol=1e-6, atol=0)


def test_trained_window():
    """The window ParallelComp sizes its chunks by: the pre-scaling window where the config has one."""
    rope = {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}
    assert M.ModelArgs.from_config(config_dict(max_position_embeddings=131072, rope_parameters=rope)
                                   ).trained_window == 8192
    assert M.ModelArgs.from_config(config_dict(max_position_embeddings=4096)).trained_window == 4096
    # Mistral v0.1 slides a 4096-token window over a 32K context: full attention is exact only inside it
    mistral = config_dict(model_type="mistral", max_position_embeddings=32768, sliding_window=4096)
    assert M.ModelArgs.from_config(mistral).trained_window == 4096
    assert M.ModelArgs.from_config({**mistral, "sliding_window": None}).trained_window == 32768
    # Qwen2 writes a sliding_window it does not use unless use_sliding_window is true
    qwen = config_dict(model_type="qwen2", max_position_embeddings=32768, sliding_window=4096)
    assert M.ModelArgs.from_config({**qwen, "use_sliding_window": False}).trained_window == 32768


# ----------------------------------------------------------------------------------------------------
# Attention: every path of model.attention against an explicit masked softmax

def test_causal_mask_is_bottom_right_aligned():
    assert M.causal_mask(2, 4, "cpu").tolist() == [[True, True, True, False], [True, True, True, True]]
    assert M.causal_mask(3, 3, "cpu").tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("t_q, t_k", [(9, 9), (4, 11), (1, 11), (1, 1)],
                         ids=["square", "fewer_queries", "one_query", "one_token"])
@pytest.mark.parametrize("h, h_kv", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_attention_paths_match_reference(t_q, t_k, h, h_kv):
    q, k, v = qkv(2, h, h_kv, t_q, t_k, seed=t_q * 100 + t_k + h_kv)
    torch.testing.assert_close(M.attention(q, k, v).double(), reference_attention(q, k, v), rtol=0, atol=1e-5)


def test_attention_batch_of_right_padded_chunks_equals_each_chunk_alone():
    """Several independent chunks in one call: real rows of a right-padded batch equal each chunk run alone."""
    lengths, t = [10, 6, 3], 10
    q, k, v = qkv(len(lengths), 4, 2, t, t, seed=1)
    out = M.attention(q, k, v)
    for b, n in enumerate(lengths):
        alone = M.attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        torch.testing.assert_close(out[b:b + 1, :, :n], alone, rtol=0, atol=1e-6)
        torch.testing.assert_close(alone.double(), reference_attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n],
                                                              v[b:b + 1, :, :n]), rtol=0, atol=1e-5)


@pytest.mark.skipif(not (torch.cuda.is_available() and M.flash_attn_func is not None),
                    reason="the flash-attn path needs CUDA and the flash_attn package")
@pytest.mark.parametrize("t_q, t_k, h, h_kv", [(64, 64, 8, 2), (5, 64, 8, 2), (1, 64, 8, 8), (64, 64, 4, 4)])
def test_flash_attention_path_matches_reference(t_q, t_k, h, h_kv):
    q, k, v = qkv(2, h, h_kv, t_q, t_k, d=64, dtype=torch.float16, device="cuda")
    got = M.attention(q, k, v).double().cpu()
    want = reference_attention(q.float().cpu(), k.float().cpu(), v.float().cpu())
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


# ----------------------------------------------------------------------------------------------------
# The forward pass against transformers (float32)

@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(ckpts, name):
    """Max abs difference < 1e-4 over 1,100 random tokens, at positions 0.. and at positions that start near
    100,000 with gaps (RoPE is relative, so only uneven steps make absolute position ids observable)."""
    path = ckpts(name)
    ours, ref = M.load_model(path), hf_model(path)
    tokens = rand_tokens(1, LONG, seed=len(name)).repeat(2, 1)  # the same tokens in both rows
    steps = torch.randint(1, 4, (LONG,), generator=torch.Generator().manual_seed(1))
    positions = torch.stack([torch.arange(LONG), 100_000 + torch.cumsum(steps, 0)])  # (2, T)
    with torch.no_grad():
        got = ours(tokens, positions)
        want = ref(input_ids=tokens, position_ids=positions).logits
    assert got.dtype == torch.float32 and got.shape == (2, LONG, 512)
    assert (got - want).abs().max().item() < 1e-4
    assert (got[0] - got[1]).abs().max().item() > 1e-2  # the uneven far positions do change the logits


def test_variant_checkpoints_have_the_layout_they_claim(ckpts):
    """Guards the parity test above: each variant really exercises what its name says."""
    sharded = ckpts("sharded")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len(M.weight_files(sharded)) > 1
    tied = M.load_model(ckpts("llama_tied"))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert "lm_head.weight" not in load_file(os.path.join(ckpts("llama_tied"), "model.safetensors"))
    qwen = M.load_model(ckpts("qwen2_qkv_bias"))
    assert qwen.layers[0].attention.wk.bias.abs().sum() > 0 and qwen.layers[0].attention.wo.bias is None
    assert (qwen.layers[1].ffn_norm.weight != 1).all()  # norm weights are random too
    biased = M.load_model(ckpts("llama_all_bias"))
    assert biased.layers[1].attention.wo.bias is not None and biased.layers[1].feed_forward.w2.bias is not None
    assert M.load_args(ckpts("llama31_rope")).rope_scaling["rope_type"] == "llama3"
    assert M.load_args(ckpts("mistral")).model_type == "mistral"
    assert M.load_args(ckpts("llama_gqa")).n_kv_heads == 2


def test_mistral_sliding_window_parity_up_to_trained_window(tmp_path):
    """A Mistral checkpoint with a short sliding window: trained_window is capped at it, and inside it our
    full attention equals transformers' sliding-window attention (beyond it the two differ, by design)."""
    path = make_checkpoint(str(tmp_path / "mistral"), model_type="mistral", sliding_window=48, random_vectors=True)
    ours, ref = M.load_model(path), hf_model(path)
    assert ours.args.trained_window == 48
    tokens, positions = rand_tokens(1, 48, seed=3), torch.arange(48)[None]
    with torch.no_grad():
        diff = (ours(tokens, positions) - ref(input_ids=tokens, position_ids=positions).logits).abs().max()
    assert diff.item() < 1e-4


def test_logits_at_returns_exactly_those_rows(ckpts):
    """The requested rows, in the requested order (repeats allowed). Equal up to float rounding only: the LM
    head's matmul over 3 rows and over 40 rows may block the sum differently (seen: 6e-7 on CPU)."""
    model = M.load_model(ckpts("llama_gqa"))
    tokens, positions = rand_tokens(2, 40, seed=5), torch.arange(40).repeat(2, 1)
    rows = torch.tensor([[0, 17, 39], [38, 2, 2]])
    with torch.no_grad():
        full = model(tokens, positions)
        some = model(tokens, positions, logits_at=rows)
    assert some.shape == (2, 3, 512) and some.dtype == torch.float32
    for b in range(2):
        torch.testing.assert_close(some[b], full[b, rows[b]], rtol=0, atol=1e-5)
        nearest = torch.cdist(some[b], full[b]).argmin(dim=1)  # rows of one sequence differ by O(1)
        assert nearest.tolist() == rows[b].tolist()


def test_right_padded_batch_equals_each_sequence_alone(ckpts):
    """The whole model on a batch of right-padded sequences (ParallelComp's chunk batches)."""
    model = M.load_model(ckpts("llama_gqa"))
    lengths = [30, 18, 7]
    tokens = rand_tokens(len(lengths), 30, seed=6)
    positions = torch.arange(30).repeat(len(lengths), 1)
    with torch.no_grad():
        batch = model(tokens, positions)
        for b, n in enumerate(lengths):
            alone = model(tokens[b:b + 1, :n], positions[b:b + 1, :n])
            torch.testing.assert_close(batch[b:b + 1, :n], alone, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Incremental decoding with KVCache

@pytest.mark.parametrize("name,grow", [("llama_gqa", 256), ("qwen2_qkv_bias", 256), ("llama_gqa", 2)])
def test_incremental_decoding_reproduces_full_forward(ckpts, name, grow):
    """Prefill, then one token at a time, then a few at a time (queries fewer than keys: the bottom-right
    causal mask path) reproduce one full forward within 1e-5; grow=2 makes the cache reallocate often."""
    model = M.load_model(ckpts(name))
    t = 60
    tokens, positions = rand_tokens(2, t, seed=7), 1000 + torch.arange(t).repeat(2, 1)
    with torch.no_grad():
        full = model(tokens, positions)
        cache, start = M.KVCache(model.args.n_layers, grow=grow), 0
        for step in [25, 1, 1, 1, 3, 5, 1, 2, 4, 17]:
            end = start + step
            part = model(tokens[:, start:end], positions[:, start:end], cache=cache)
            torch.testing.assert_close(part, full[:, start:end], rtol=0, atol=1e-5)
            assert cache.length == end
            start = end
    assert start == t
    assert cache.keys(0).shape == (2, model.args.n_kv_heads, t, model.args.head_dim)  # kept at n_kv_heads


# ----------------------------------------------------------------------------------------------------
# Loading: meta-device construction, strict loading, and one-line errors that name the file or tensor

def test_meta_construction_and_strict_load(ckpts, monkeypatch):
    """Parameters are created on the meta device (no random init of real memory), and after loading every
    parameter holds exactly the checkpoint's tensor."""
    init_devices = []
    for cls in (torch.nn.Linear, torch.nn.Embedding):
        orig = cls.reset_parameters

        def spy(self, orig=orig):
            init_devices.append(self.weight.device.type)
            return orig(self)
        monkeypatch.setattr(cls, "reset_parameters", spy)
    path = ckpts("llama_all_bias")
    model = M.load_model(path)
    assert init_devices and set(init_devices) == {"meta"}

    ckpt = load_file(os.path.join(path, "model.safetensors"))
    names = M.hf_name_map(model.args)
    assert set(names) == set(ckpt)
    params = dict(model.named_parameters())
    assert set(params) == set(names.values())
    for src, dst in names.items():
        assert torch.equal(params[dst], ckpt[src]), src
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    torch.testing.assert_close(model.inv_freq, M.rope_inv_freq(model.args), rtol=0, atol=0)


def test_load_in_bfloat16_keeps_rope_and_logits_in_float32(ckpts):
    model = M.load_model(ckpts("llama_tied"), dtype=torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 and model.output.weight is model.tok_embeddings.weight
    assert model.inv_freq.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        logits = model(rand_tokens(1, 8), torch.arange(8)[None])
        want = M.load_model(ckpts("llama_tied"))(rand_tokens(1, 8), torch.arange(8)[None])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits - want).abs().max() < 0.05 * want.abs().max()  # the same weights, rounded to bfloat16


def drop(key):
    def fn(t):
        del t[key]
        return t
    return fn


def put(key, value):
    def fn(t):
        t[key] = value
        return t
    return fn


def remove_second_shard(folder):
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    os.remove(os.path.join(folder, shards[1]))
    return shards[1]


def edit_config(drop=(), **over):
    return lambda folder: edit_json(folder, "config.json", drop, **over)


def write_config(text):
    def fn(folder):
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write(text)
    return fn


BROKEN = {  # name -> (variant to start from, damage(folder) -> optional name, words the message must contain)
    "missing_tensor": ("llama_gqa", lambda d: rewrite_weights(d, drop("model.layers.1.mlp.up_proj.weight")),
                       ["model.layers.1.mlp.up_proj.weight", "missing"]),
    "extra_tensor": ("llama_gqa", lambda d: rewrite_weights(d, put("model.layers.2.mlp.up_proj.weight",
                                                                   torch.zeros(128, 64))),
                     ["model.safetensors", "model.layers.2.mlp.up_proj.weight", "unexpected"]),
    "wrong_shape": ("llama_gqa", lambda d: rewrite_weights(d, put("model.layers.0.self_attn.k_proj.weight",
                                                                  torch.zeros(64, 64))),
                    ["model.safetensors", "model.layers.0.self_attn.k_proj.weight", "(64, 64)", "(32, 64)"]),
    "truncated_file": ("llama_gqa", lambda d: truncate_weights(d, lambda n: n // 2), ["model.safetensors", "truncated"]),
    "absent_shard": ("sharded", remove_second_shard, ["model-00002-of-", "missing"]),
    "missing_config": ("llama_gqa", lambda d: os.remove(os.path.join(d, "config.json")), ["config.json"]),
    "config_not_json": ("llama_gqa", write_config("{'model_type': llama"), ["config.json", "JSON"]),
    "unsupported_model_type": ("llama_gqa", edit_config(model_type="gpt2"), ["config.json", "gpt2"]),
    "unsupported_rope_type": ("llama_gqa", edit_config(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
                              ["config.json", "yarn"]),
    "config_missing_field": ("llama_gqa", edit_config(drop=("hidden_size",)), ["config.json", "hidden_size"]),
    "only_pickled_weights": ("llama_gqa", only_pickled_weights, [".bin", "safetensors"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_raises_one_line_checkpoint_error(ckpts, tmp_path, case):
    variant, damage, words = BROKEN[case]
    folder = str(tmp_path / "ckpt")
    shutil.copytree(ckpts(variant), folder)
    damage(folder)
    with pytest.raises(M.CheckpointError) as err:
        M.load_model(folder)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for word in words:
        assert word in msg, (word, msg)


def test_intact_copy_loads(ckpts, tmp_path):
    """The damage above is what fails, not the copying."""
    folder = str(tmp_path / "ckpt")
    shutil.copytree(ckpts("sharded"), folder)
    assert isinstance(M.load_model(folder), M.Transformer)
    with pytest.raises(M.CheckpointError, match="does not exist"):
        M.load_model(str(tmp_path / "nowhere"))
