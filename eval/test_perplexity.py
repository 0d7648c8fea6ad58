"""Perplexity by length: ParallelComp with one chunk holding the whole context is full attention (tiny random
checkpoint, seconds), and with several chunks it reads only the kept ones."""
import pytest
import torch

from eval.perplexity import nll_full, nll_parallelcomp
from model import load_model
from parallelcomp import ParallelCompConfig
from tokenizer import load_tokenizer


@pytest.fixture
def tiny(tiny_ckpt):
    path = tiny_ckpt(max_position_embeddings=512)
    return load_model(path), load_tokenizer(path)


def test_one_chunk_equals_full_attention(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (300,), generator=g)
    ctx, cont = ids[:260], ids[260:]
    bos = torch.tensor([tok.bos_id]) if tok.bos_id is not None else torch.tensor([], dtype=torch.long)
    full = nll_full(model, torch.cat([bos, ctx, cont]), len(bos) + len(ctx))
    pc, info = nll_parallelcomp(model, tok, ctx, cont, ParallelCompConfig(chunk_size=400, keep_chunks=1))
    assert info == {"chunks": 1, "kept": [0]}
    assert pc == pytest.approx(full, abs=1e-5)


def test_several_chunks_keep_k_and_differ_from_full(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (340,), generator=g)
    ctx, cont = ids[:300], ids[300:]
    pc, info = nll_parallelcomp(model, tok, ctx, cont, ParallelCompConfig(chunk_size=100, keep_chunks=2))
    assert info["chunks"] >= 3 and len(info["kept"]) == 2
    bos = torch.tensor([tok.bos_id]) if tok.bos_id is not None else torch.tensor([], dtype=torch.long)
    assert pc != pytest.approx(nll_full(model, torch.cat([bos, ctx, cont]), len(bos) + len(ctx)), abs=1e-4)
