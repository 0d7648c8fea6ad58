"""Shared test fixtures: tiny random checkpoints written by `transformers` in the real Hugging Face layout,
and a SentencePiece tokenizer trained in-process (seconds). Nothing is downloaded."""
import json
import os
import random

import pytest
import torch

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
                    max_shard_size=None, **config) -> str:
    """Save a random tiny model with `save_pretrained` (safetensors) plus tokenizer files; returns `path`."""
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
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    if sp_model:
        import shutil
        shutil.copy(sp_model, os.path.join(path, "tokenizer.model"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, f)
    return path


@pytest.fixture
def tiny_ckpt(tmp_path, sp_model):
    """Factory: tiny_ckpt(name, **config) -> checkpoint folder with a SentencePiece tokenizer."""
    def make(name="ckpt", **kw):
        return make_checkpoint(str(tmp_path / name), sp_model, **kw)
    return make
