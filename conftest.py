"""Shared test fixtures: tiny random checkpoints written by `transformers` in the real Hugging Face layout,
and a SentencePiece tokenizer trained in-process (seconds). Nothing is downloaded. Also the helpers that
several test files use: the plain greedy reference and the ways to damage a checkpoint folder."""
import json
import math
import os
import random

# idle OpenMP threads sleep instead of spinning (as generate.py does): on a shared machine, spinning made
# chunk prefill many times slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

WORDS = ("the grass is green and the sky is blue while the sun is yellow here we go again and again "
         "café naïve jalapeño über straße 東京 数字 مرحبا 😀 pass key secret code door number is what").split()


def sample_text(rng: random.Random, n_sentences: int) -> str:
    """Varied text with sentence and line ends, digits and non-ASCII characters."""
    out = []
    for i in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.2:
            words.append(str(rng.randint(0, 99999)))
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ".\n", ".\n\n"]))
    return " ".join(out)


def train_sentencepiece(prefix: str, vocab_size: int = 512) -> str:
    """A Llama-style SentencePiece model (identity normalization, no whitespace folding, byte fallback)."""
    import sentencepiece as spm
    rng = random.Random(0)
    corpus = prefix + ".txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(3000):
            f.write(sample_text(rng, 3).replace("\n", " ") + "\n")
    spm.SentencePieceTrainer.Train(
        input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, bos_id=1, eos_id=2, unk_id=0,
        minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    return train_sentencepiece(str(tmp_path_factory.mktemp("sp") / "tok"))


def make_checkpoint(path: str, sp_model: str | None = None, model_type: str = "llama", seed: int = 0,
                    max_shard_size=None, random_vectors: bool = False, **config) -> str:
    """Save a random tiny model with `save_pretrained` (safetensors) plus tokenizer files; returns `path`.

    random_vectors: also randomize biases and norm weights, which `transformers` initializes to 0 and 1 (a
    mis-mapped bias or norm weight then shows in the logits)."""
    import transformers
    torch.manual_seed(seed)
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2)
    base.update(config)
    cls, cfg_cls = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
                    "mistral": ("MistralForCausalLM", "MistralConfig")}[model_type]
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**base)).eval()
    with torch.no_grad():  # larger weights than HF's init, so logits are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
            elif random_vectors:
                p.add_(torch.randn_like(p) * 0.1)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    if sp_model:
        import shutil
        shutil.copy(sp_model, os.path.join(path, "tokenizer.model"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            # tokenizer_class as Llama 2 folders write it: without it transformers 5 converts tokenizer.model
            # with a generic converter that drops SentencePiece's dummy prefix ("hello" -> "he", not "▁he")
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                       "tokenizer_class": "LlamaTokenizer"}, f)
    return path


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory, sp_model) -> str:
    """The default tiny checkpoint (SentencePiece tokenizer, 256-token window), shared: copy it before changing it.
    test_parallelcomp.py has its own (a 512-token window, 4 layers)."""
    return make_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "ckpt"), sp_model)


@pytest.fixture
def tiny_ckpt(tmp_path, sp_model):
    """Factory: tiny_ckpt(name, **config) -> checkpoint folder with a SentencePiece tokenizer."""
    def make(name="ckpt", **kw):
        return make_checkpoint(str(tmp_path / name), sp_model, **kw)
    return make


# Llama 3's pre-tokenizer split (tokenizer.json of Meta-Llama-3-8B), applied before byte-level BPE.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def train_byte_bpe(path: str, vocab_size: int = 600) -> str:
    """A Llama 3-style tokenizer folder built in-process with `tokenizers` (well under a second): byte-level
    BPE behind Llama 3's regex split, special tokens appended after the BPE vocabulary, a post-processor that
    prepends <|begin_of_text|>, tokenizer_config.json with bos/eos strings and generation_config.json with a
    list of eos ids (<|end_of_text|> and <|eot_id|>). Returns `path`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    tok.train_from_iterator((sample_text(rng, 3) for _ in range(2000)), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(list(LLAMA3_SPECIALS))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                   "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos,
                   "eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]}, f)
    return path


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> str:
    """Folder with a Llama 3-style tokenizer.json (see train_byte_bpe); copy it before modifying."""
    return train_byte_bpe(str(tmp_path_factory.mktemp("bpe")))


# ----------------------------------------------------------------------------------------------------
# The plain reference decoder, and damage to checkpoint folders (shared by the test files)

@torch.inference_mode()
def plain_greedy(model, tokens: list[int], n: int, stop_ids) -> list[int]:
    """Greedy decoding by a full forward over the whole sequence for every new token: no cache, positions
    0..T-1. The simplest possible reference."""
    out = []
    for _ in range(n):
        logits = model(torch.tensor([tokens + out]), torch.arange(len(tokens) + len(out))[None])
        token = int(logits[0, -1].argmax())
        if token in stop_ids:
            break
        out.append(token)
    return out


def rewrite_weights(folder: str, fn) -> None:
    """model.safetensors replaced by fn(its tensors)."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    save_file(fn(load_file(path)), path, metadata={"format": "pt"})


def read_json(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


def write_json(folder: str, name: str, data) -> None:
    """A file of the folder replaced: JSON for a dict or list, as is for a str (e.g. a chat_template.jinja)."""
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


def edit_json(folder: str, name: str, drop: tuple[str, ...] = (), **over) -> None:
    """The folder's JSON file with the keys `over` set and the keys `drop` removed; the test helpers' one JSON edit."""
    data = {k: v for k, v in read_json(folder, name).items() if k not in drop}
    write_json(folder, name, {**data, **over})


def truncate_weights(folder: str, keep) -> None:
    """model.safetensors cut to keep(its size) bytes."""
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(keep(os.path.getsize(path)))


def only_pickled_weights(folder: str) -> None:
    os.remove(os.path.join(folder, "model.safetensors"))
    open(os.path.join(folder, "pytorch_model.bin"), "wb").close()


# ----------------------------------------------------------------------------------------------------
# Attention references (tests/test_model.py, tests/test_flash_attn.py)

def qkv(b, h, h_kv, t_q, t_k, d=16, seed=0, dtype=torch.float32, device="cpu"):
    """Random q [B, H, Tq, d] and k, v [B, Hkv, Tk, d]."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n, t in ((h, t_q), (h_kv, t_k), (h_kv, t_k)))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def reference_attention(q, k, v):
    """Independent of model.attention and of the flash-attn stand-in: softmax(q k^T / sqrt(d) + bottom-right
    causal mask) v in float64, per query head, written with explicit loops over heads and rows. q [B, H, Tq, D], k/v [B, Hkv, Tk, D] -> [B, H, Tq, D]."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    b, h, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    out = torch.zeros(b, h, t_q, d, dtype=torch.float64)
    for head in range(h):
        kh, vh = k[:, head * h_kv // h], v[:, head * h_kv // h]  # (B, Tk, D): this head's group's KV head
        for i in range(t_q):
            visible = i + t_k - t_q + 1  # keys 0 .. i + Tk - Tq
            w = (q[:, head, i:i + 1] @ kh[:, :visible].transpose(-1, -2) / math.sqrt(d)).softmax(-1)  # (B, 1, vis)
            out[:, head, i] = (w @ vh[:, :visible])[:, 0]
    return out
