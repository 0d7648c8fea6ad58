"""Perplexity by length, the fair protocol: one chunk holding the whole context is full attention with the same
header (BOS) for both; pc-query's selection never sees the scored tokens, the oracle's does; every method scores the
same tokens; runs resume; the OpenMP wait policy is set before torch loads (tiny random checkpoint, seconds)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from eval import perplexity as ppl
from eval.perplexity import header_ids, nll_chunks, nll_full, run_methods
from model import load_model
from parallelcomp import ParallelCompConfig
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny(tiny_ckpt):
    path = tiny_ckpt(max_position_embeddings=512)
    return load_model(path), load_tokenizer(path), path


def test_one_chunk_equals_full_attention_with_the_same_header(tiny):
    model, tok, _ = tiny
    header = header_ids(tok)
    assert len(header) == 1  # a BOS tokenizer: both methods must read it
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (300,), generator=g)
    ctx, query, scored = ids[:240], ids[240:260], ids[260:]
    full = nll_full(model, header, ctx, query, scored)
    (pc, kept), = nll_chunks(model, header, ctx, query, scored, [(0, 240)], {"pc": query},
                             ParallelCompConfig(chunk_size=400, keep_chunks=1)).values()
    assert kept == [0] and pc == pytest.approx(full, abs=1e-5)
    # without the BOS the full-attention number is another one: the header matters and is shared
    assert nll_full(model, header[:0], ctx, query, scored) != pytest.approx(full, abs=1e-4)


def args(**kw):
    base = dict(query=16, cont=20, chunk_size=60, keep_chunks=2)
    return type("A", (), {**base, **kw})


def test_query_selection_never_sees_the_scored_tokens_and_the_oracle_does(tiny):
    model, tok, _ = tiny
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (400,), generator=g)
    at = 300
    other = ids.clone()
    kept_q, kept_o = set(), set()
    for seed in range(6):  # other scored tokens: pc-query keeps the same chunks, the oracle's choice moves
        other[at:at + 20] = torch.randint(3, 500, (20,), generator=torch.Generator().manual_seed(10 + seed))
        both = run_methods(["pc-query", "oracle"], model, tok, other, at, 240, 0, args())
        kept_q.add(tuple(both["pc-query"]["kept"]))
        kept_o.add(tuple(both["oracle"]["kept"]))
        # the shared chunk encoding changes nothing: each selection alone gives the same record
        assert both == {m: run_methods([m], model, tok, other, at, 240, 0, args())[m] for m in both}
    assert len(kept_q) == 1 and len(kept_o) > 1


def test_baselines_keep_k_chunks_at_the_same_budget(tiny):
    model, tok, _ = tiny
    ids = torch.randint(3, 500, (400,), generator=torch.Generator().manual_seed(2))
    last, rnd = run_methods(["last-k", "random-k"], model, tok, ids, 300, 240, 0, args()).values()
    assert last["chunks"] >= 4 and last["kept"] == [last["chunks"] - 2, last["chunks"] - 1]
    assert len(rnd["kept"]) == 2 and rnd == run_methods(["random-k"], model, tok, ids, 300, 240, 0, args())["random-k"]


@pytest.mark.skipif(shutil.which("bible") is None, reason="bible-kjv is not installed (make eval-deps)")
def test_cli_resumes_and_reports_every_method(tiny, tmp_path, capsys):
    _, _, path = tiny
    out = str(tmp_path / "p.jsonl")
    argv = ["--ckpt", path, "--lengths", "120,240", "--n", "2", "--full-limit", "120", "--query", "16",
            "--cont", "20", "--chunk-size", "60", "--keep-chunks", "2", "--out", out]
    assert ppl.main(argv) == 0
    rows = ppl.read_records(out)
    # full attention only up to --full-limit; every other method at both lengths, 2 continuations each
    assert len(rows) == 2 * (1 + 4 * 2) and {r["method"] for r in rows if r["n"] == 240} == set(ppl.METHODS) - {"full"}
    assert len({r["at"] for r in rows}) == 2
    assert ppl.main(argv) == 0 and ppl.read_records(out) == rows  # resumed: nothing re-run
    argv[argv.index("--n") + 1] = "3"  # the starts of --n 3 include those of --n 2: only the middle one is new
    assert ppl.main(argv) == 0
    more = ppl.read_records(out)
    assert more[:len(rows)] == rows and len({r["at"] for r in more}) == 3 and len(more) == len(rows) * 3 // 2
    rows = more
    table = ppl.report(rows)
    assert "oracle (upper bound" in table and "n=3" in table and "| random-k |" in table


def test_wait_policy_is_set_before_torch_is_imported():
    code = ("import os, sys\n"
            "seen = []\n"
            "class Hook:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' and not seen:\n"
            "            seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
            "        return None\n"
            "sys.meta_path.insert(0, Hook())\n"
            "import eval.perplexity\n"
            "print(seen)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['PASSIVE']"
