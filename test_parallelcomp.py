"""Tests of the algorithm (parallelcomp.py), stage by stage, on tiny random checkpoints.

Independent references: Hugging Face `transformers` (chunk scores; the assembled cache and the question's
positions, through an explicit 4D attention mask), naive per-head loops (KV eviction), and plain decoding.
"""
import math
import random

import pytest
import torch

import parallelcomp as pc
from cli_io import parse_calibration
from conftest import plain_greedy, sample_text
from model import KVCache, load_model
from tokenizer import load_tokenizer

QUESTION = "What is the secret code?"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, sp_model):
    from conftest import make_checkpoint
    return make_checkpoint(str(tmp_path_factory.mktemp("pc") / "ckpt"), sp_model, max_position_embeddings=512,
                           num_hidden_layers=4)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(ckpt), load_tokenizer(ckpt)


def context_text(seed: int, n_sentences: int) -> str:
    return sample_text(random.Random(seed), n_sentences)


# ----------------------------------------------------------------------------------------------------
# Whole method

def test_one_chunk_equals_plain_model(loaded):
    model, tok = loaded
    context = context_text(1, 12)
    result = pc.answer(model, tok, context, QUESTION, pc.ParallelCompConfig(keep_chunks=1), max_new_tokens=12,
                         trace=True)
    assert result.stats["chunks_total"] == 1
    prompt = tok.encode_prompt(context, QUESTION)
    ids = prompt.header + prompt.context + prompt.question
    with torch.no_grad():
        ref = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1]
    torch.testing.assert_close(result.trace["first_logits"], ref, atol=1e-5, rtol=0)
    assert result.ids == plain_greedy(model, ids, 12, set(tok.stop_ids))
    assert len(result.ids) > 0


def test_full_baseline_equals_plain_model(loaded):
    model, tok = loaded
    context = context_text(2, 30)
    result = pc.answer(model, tok, context, QUESTION, method="full", max_new_tokens=8)
    prompt = tok.encode_prompt(context, QUESTION)
    ids = prompt.header + prompt.context + prompt.question
    assert result.ids == plain_greedy(model, ids, 8, set(tok.stop_ids))


def test_full_baseline_middle_truncation():
    ctx = torch.arange(100)
    kept = pc.middle_truncate(ctx, 10)
    assert kept.tolist() == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    assert pc.middle_truncate(ctx, 200).tolist() == ctx.tolist()


@pytest.mark.parametrize("instruction", ["", "Read the story. Then answer.\n"], ids=["plain", "instruction"])
def test_chunk_scores_match_transformers(ckpt, loaded, instruction):
    """I_c recomputed independently: HF's model on each [BOS] (+ instruction) + chunk + question, mean NLL of
    the question. An instruction is read by every chunk and is not part of the scored question."""
    import transformers
    model, tok = loaded
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    context = context_text(3, 60)
    cfg = pc.ParallelCompConfig(chunk_size=90, keep_chunks=2, chunk_batch=3)
    result = pc.answer(model, tok, context, QUESTION, cfg, max_new_tokens=2, trace=True, instruction=instruction)
    t = result.trace
    q = t["question_ids"]
    header = torch.tensor([tok.bos_id] + tok.encode(instruction.strip()))  # "▁Read ... answer." then "\n"
    assert t["header_ids"][:len(header)].tolist() == header.tolist() and len(t["header_ids"]) <= len(header) + 1
    assert tok.decode(q.tolist()).strip() == QUESTION
    assert len(t["chunk_bounds"]) >= 5
    for c, (start, end) in enumerate(t["chunk_bounds"].tolist()):
        ids = torch.cat([t["header_ids"], t["context_ids"][start:end], q])[None]
        with torch.no_grad():
            logits = hf(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits[-len(q) - 1:-1], -1)
        nll = -logp.gather(1, q[:, None]).mean()
        assert abs(float(nll) - float(t["chunk_scores"][c])) < 1e-4, c
    assert t["kept_chunks"].tolist() == sorted(t["chunk_scores"].argsort()[:2].tolist())


def two_chunk_reference(hf, trace, bos_id: int, cached=None) -> torch.Tensor:
    """transformers' last-token logits for [BOS c1 | BOS c2 | question] as one sequence with a 4D mask: each
    chunk attends causally within itself at positions 0.., the question attends causally to itself at
    positions M = 1 + the longer chunk .., and to the `cached` indices of that sequence (default: both chunks,
    chunk 2 without its BOS, which the assembled cache drops). Returns the logits [vocab] float32."""
    (s1, e1), (s2, e2) = trace["chunk_bounds"].tolist()
    c1, c2, q = trace["context_ids"][s1:e1], trace["context_ids"][s2:e2], trace["question_ids"]
    bos = torch.tensor([bos_id])
    ids = torch.cat([bos, c1, bos, c2, q])
    n1, n2, nq = 1 + len(c1), 1 + len(c2), len(q)
    m = max(n1, n2)
    positions = torch.cat([torch.arange(n1), torch.arange(n2), torch.arange(m, m + nq)])
    if cached is None:
        cached = [i for i in range(n1 + n2) if i != n1]
    total = len(ids)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:n1, :n1] = torch.tril(torch.ones(n1, n1, dtype=torch.bool))
    allowed[n1:n1 + n2, n1:n1 + n2] = torch.tril(torch.ones(n2, n2, dtype=torch.bool))
    allowed[n1 + n2:, cached] = True
    allowed[n1 + n2:, n1 + n2:] = torch.tril(torch.ones(nq, nq, dtype=torch.bool))
    mask = torch.zeros(1, 1, total, total).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        return hf(input_ids=ids[None], position_ids=positions[None], attention_mask=mask).logits[0, -1].float()


def test_assembled_cache_and_question_positions_match_transformers(ckpt, loaded):
    """Stages 4-5 against an explicit construction in HF: one sequence [BOS c1 | BOS c2 | question] whose 4D mask
    lets each chunk attend only within itself, and the question attend to chunk 1 with its BOS and chunk 2
    without its BOS; chunk positions restart at 0, question positions start at M = 1 + longest chunk."""
    import transformers
    model, tok = loaded
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    context = context_text(4, 20)
    cfg = pc.ParallelCompConfig(chunk_size=120, keep_chunks=2)
    result = pc.answer(model, tok, context, QUESTION, cfg, max_new_tokens=1, trace=True)
    t = result.trace
    assert len(t["chunk_bounds"]) == 2 and t["kept_chunks"].tolist() == [0, 1]
    torch.testing.assert_close(t["first_logits"], two_chunk_reference(hf, t, tok.bos_id), atol=1e-4, rtol=0)


def test_kv_eviction_matches_transformers_with_the_evicted_tokens_masked(tmp_path_factory, sp_model):
    """Stages 3-5 with KV eviction against transformers: one layer, one KV head (so one 4D mask says which
    tokens are cached). Chunks attend to all their own tokens; the question attends only to the kept ones, at
    positions from M = 1 + the longest kept chunk counted *before* eviction."""
    import transformers
    from conftest import make_checkpoint
    path = make_checkpoint(str(tmp_path_factory.mktemp("mqa") / "ckpt"), sp_model, max_position_embeddings=512,
                           num_hidden_layers=1, num_key_value_heads=1)
    model, tok = load_model(path), load_tokenizer(path)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    cfg = pc.ParallelCompConfig(chunk_size=120, keep_chunks=2, kv_capacity=40)
    t = pc.answer(model, tok, context_text(4, 20), QUESTION, cfg, max_new_tokens=1, trace=True).trace
    assert len(t["chunk_bounds"]) == 2 and t["kept_chunks"].tolist() == [0, 1]
    (s1, e1), (s2, e2) = t["chunk_bounds"].tolist()
    kept = t["kv_kept.0"][0].tolist()  # offsets into the context ids, -1 for the BOS
    assert len(kept) == 1 + 2 * 40
    n1 = 1 + e1 - s1
    cached = [0 if o < 0 else (1 + o - s1 if o < e1 else n1 + 1 + o - s2) for o in kept]  # in the sequence
    ref = two_chunk_reference(hf, t, tok.bos_id, cached)
    torch.testing.assert_close(t["first_logits"], ref, atol=1e-4, rtol=0)


def test_chunk_batch_does_not_change_results(loaded):
    model, tok = loaded
    context = context_text(5, 80)
    runs = [pc.answer(model, tok, context, QUESTION, pc.ParallelCompConfig(chunk_size=70, keep_chunks=3,
                        chunk_batch=b, kv_capacity=30), max_new_tokens=6, trace=True) for b in (1, 4, 100)]
    assert len(runs[0].trace["chunk_bounds"]) > 6
    for r in runs[1:]:
        assert r.ids == runs[0].ids
        assert r.trace["kept_chunks"].tolist() == runs[0].trace["kept_chunks"].tolist()
        torch.testing.assert_close(r.trace["chunk_scores"], runs[0].trace["chunk_scores"], atol=1e-5, rtol=0)
        for layer in range(4):
            assert torch.equal(r.trace[f"kv_kept.{layer}"], runs[0].trace[f"kv_kept.{layer}"])


def test_no_state_leaks_between_calls(loaded):
    model, tok = loaded
    cfg = pc.ParallelCompConfig(chunk_size=60, keep_chunks=2, kv_capacity=20, calibration=[("all", 2, 3)],
                                calibration_threshold=0.05)
    a_first = pc.answer(model, tok, context_text(6, 40), QUESTION, cfg, max_new_tokens=5, trace=True)
    b_after = pc.answer(model, tok, context_text(7, 25), "Where is the door number?", cfg, max_new_tokens=5, trace=True)
    b_fresh = pc.answer(load_model_like(model), tok, context_text(7, 25), "Where is the door number?", cfg,
                          max_new_tokens=5, trace=True)
    a_again = pc.answer(model, tok, context_text(6, 40), QUESTION, cfg, max_new_tokens=5, trace=True)
    for x, y, exact in ((a_first, a_again, True), (b_after, b_fresh, False)):
        assert x.ids == y.ids
        assert x.trace.keys() == y.trace.keys()
        for key in x.trace:
            if exact or not x.trace[key].is_floating_point():
                assert torch.equal(x.trace[key], y.trace[key]), key
            else:  # another model object: same weights, other memory alignment, last-bit differences
                torch.testing.assert_close(x.trace[key], y.trace[key], atol=1e-5, rtol=0)
    assert cfg.chunk_size == 60 and cfg.kv_capacity == 20  # the caller's config is never modified


def load_model_like(model):
    import copy
    return copy.deepcopy(model)


def test_default_chunk_size_fits_the_trained_window(loaded):
    """Every position the default run uses stays inside the trained window: chunk inputs (header + chunk +
    question at 0..n-1), the question at M.., and the generated tokens after it."""
    model, tok = loaded
    window, max_new = model.args.trained_window, 10
    result = pc.answer(model, tok, context_text(8, 200), QUESTION, max_new_tokens=max_new, trace=True)
    t = result.trace
    n_h, n_q = len(t["header_ids"]), len(t["question_ids"])
    lengths = (t["chunk_bounds"][:, 1] - t["chunk_bounds"][:, 0]).tolist()
    assert len(lengths) > 3 and max(n_h + n + n_q for n in lengths) <= window
    m = n_h + max(lengths[c] for c in t["kept_chunks"].tolist())
    assert m + n_q + max_new <= window
    assert result.stats["chunk_size"] == window - n_h - n_q - max_new  # and no smaller than that allows


def test_an_implausibly_large_config_window_needs_an_explicit_chunk_size(loaded):
    """Mistral-Nemo's config says 1,024,000 tokens and no sliding window: a default chunk that large would be
    full attention over the whole input, silently."""
    import dataclasses
    model, tok = loaded
    model.args = dataclasses.replace(model.args, max_position_embeddings=1_024_000)
    try:
        with pytest.raises(pc.ConfigError, match="--chunk-size"):
            pc.answer(model, tok, context_text(8, 20), QUESTION, max_new_tokens=2)
        ok = pc.answer(model, tok, context_text(8, 20), QUESTION, pc.ParallelCompConfig(chunk_size=100),
                       max_new_tokens=2)
        assert ok.stats["chunk_size"] == 100
    finally:
        model.args = dataclasses.replace(model.args, max_position_embeddings=512)


# ----------------------------------------------------------------------------------------------------
# Stage 1: splitting

def test_split_covers_everything_and_respects_size():
    rng = random.Random(0)
    for trial in range(200):
        n, size = rng.randint(1, 3000), rng.randint(1, 400)
        strength = torch.tensor([rng.choice([0] * 20 + [1, 2]) for _ in range(n)], dtype=torch.int8)
        bounds = pc.split_chunks(strength, size)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(0 < e - s <= size for s, e in bounds)


def test_split_without_boundaries_gives_near_equal_chunks():
    bounds = pc.split_chunks(torch.zeros(1001, dtype=torch.int8), 100)
    lengths = [e - s for s, e in bounds]
    assert len(lengths) == 11 and max(lengths) - min(lengths) <= 1


def test_split_cuts_at_the_boundary_nearest_the_plan():
    strength = torch.zeros(280, dtype=torch.int8)  # 3 chunks, cuts planned at 93 and 187
    strength[[84, 97]] = 1  # sentence ends: cuts at 85 (8 before the plan) and 98 (5 after it)
    assert pc.split_chunks(strength, 100)[0] == (0, 98)  # the nearer one
    strength[91] = 1  # 92: 1 before the plan
    assert pc.split_chunks(strength, 100)[0] == (0, 92)
    strength[88] = 2  # a line end: a cut at 89, 4 from the plan, beats the sentence end inside a line at 92
    assert pc.split_chunks(strength, 100)[0] == (0, 89)
    strength[86] = 2  # of two line ends the nearer (87 is 6 from the plan)
    assert pc.split_chunks(strength, 100)[0] == (0, 89)
    strength[:] = 0
    strength[10] = 2  # a boundary far from the planned cut is not used
    assert pc.split_chunks(strength, 100)[0] == (0, 93)


@pytest.mark.parametrize("n, offset, chunks", [(200, 9, 2), (2000, 9, 20), (2001, 9, 21), (200, 4, 3),
                                              (2000, 4, 21), (95, 4, 1)])
def test_split_count_is_planned_once(n, offset, chunks):
    """A sentence end every 10 tokens. With the cuts at 10, 20, ... (offset 9) C = ceil(N / chunk_size). With
    them at 5, 15, ... (offset 4) N = 200 cannot be cut into 2 chunks at a sentence end: 3 near-equal chunks,
    where planning each chunk from the previous cut gave (95, 50, 55); and N = 2,000 gives 21, where it gave 22."""
    strength = torch.zeros(n, dtype=torch.int8)
    strength[torch.arange(offset, n, 10)] = 1
    bounds = pc.split_chunks(strength, 100)
    lengths = [e - s for s, e in bounds]
    assert len(bounds) == chunks and max(lengths) <= 100 and max(lengths) - min(lengths) <= 10
    assert all(strength[e - 1] == 1 for _, e in bounds[:-1])  # every cut on a sentence end


def test_split_never_lets_a_later_chunk_outgrow_chunk_size():
    """The pull of the cuts towards boundaries cannot push the rest past chunk_size."""
    strength = torch.zeros(250, dtype=torch.int8)  # 3 chunks of ~83: room to move, cuts planned at 83 and 167
    strength[[80, 160]] = 1
    assert pc.split_chunks(strength, 100) == [(0, 81), (81, 161), (161, 250)]
    strength = torch.zeros(300, dtype=torch.int8)  # exactly 3 x 100: cuts 90 and 190 would leave 110 at the end
    strength[[89, 189]] = 1
    assert pc.plan_cuts(strength, 100, 3, 15) == ([0, 100, 200, 300], 2)
    assert max(e - s for s, e in pc.split_chunks(strength, 100)) <= 100


def test_chunks_of_real_text_end_at_sentence_or_line_ends(loaded):
    _, tok = loaded
    ids = tok.encode(context_text(9, 400))
    strength = pc.boundary_strength(tok.token_texts)[torch.tensor(ids)]
    bounds = pc.split_chunks(strength, 170)  # 25 chunks with 134 tokens of slack in all: room for every cut
    assert len(bounds) == math.ceil(len(ids) / 170) > 10
    texts = tok.token_texts
    for _, end in bounds[:-1]:
        assert texts[ids[end - 1]].rstrip(" ").endswith((".", "!", "?", "\n")), texts[ids[end - 1]]


# ----------------------------------------------------------------------------------------------------
# Stage 2: the priority queue

def test_queue_keeps_the_k_lowest_scores_in_document_order():
    rng = random.Random(1)
    for trial in range(100):
        n, k = rng.randint(1, 40), rng.randint(1, 6)
        scores = [rng.choice([0.5, 1.0, 1.5, rng.random()]) for _ in range(n)]  # with ties
        queue = pc.ChunkQueue(k)
        for i, s in enumerate(scores):
            queue.push(pc.EncodedChunk(i, 0, 1, s, [], [], []))
            assert len(queue.heap) <= k
        want = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:k])
        assert [c.index for c in queue.kept()] == want


# ----------------------------------------------------------------------------------------------------
# Stage 3: KV eviction against a naive per-head loop

def naive_keep(q, k, length, n_header, n_context, window, capacity, kernel):
    """One chunk, one query head at a time: softmax rows, sum, GQA mean, max-pool by hand, stable top-k."""
    h, hkv, hd = q.shape[0], k.shape[0], q.shape[-1]
    g = h // hkv
    keep = []
    for kv_head in range(hkv):
        score = [0.0] * length
        for head in range(kv_head * g, (kv_head + 1) * g):
            for row in range(length - window, length):
                logits = [float(q[head, row] @ k[kv_head, j]) / math.sqrt(hd) if j <= row else -math.inf
                          for j in range(length)]
                top = max(logits)
                exps = [math.exp(x - top) for x in logits]
                for j in range(length):
                    score[j] += exps[j] / sum(exps) / g
        ctx = score[n_header:n_header + n_context]
        pooled = [max(ctx[max(0, j - kernel // 2):j + kernel // 2 + 1]) for j in range(n_context)]
        top = sorted(range(n_context), key=lambda j: (-pooled[j], j))[:capacity]
        keep.append(list(range(n_header)) + sorted(n_header + j for j in top))
    return keep


@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2)])
def test_snapkv_matches_naive_reference(h, hkv):
    torch.manual_seed(h)
    b, t, hd, window, cap, kernel, n_header, n_q = 3, 40, 8, 5, 9, 3, 1, 6
    q, k = torch.randn(b, h, t, hd, dtype=torch.float64), torch.randn(b, hkv, t, hd, dtype=torch.float64)
    n_context = [33, 20, 25]  # right-padded batch
    lengths = torch.tensor([n_header + n + n_q for n in n_context])
    for i in range(b):
        n = int(lengths[i])
        scores = pc.snapkv_scores(q[i, :, n - window:n], k[i, :, :n])
        got = pc.snapkv_keep(scores, n_header, n_context[i], cap, kernel)
        want = naive_keep(q[i], k[i], int(lengths[i]), n_header, n_context[i], window, cap, kernel)
        assert got.tolist() == want


def test_snapkv_keeps_everything_when_capacity_exceeds_chunk():
    scores = torch.rand(2, 12)
    assert pc.snapkv_keep(scores, 1, 5, 8, 7).tolist() == [list(range(6))] * 2


def test_kv_eviction_leaves_scores_unchanged_and_caps_the_cache(loaded):
    model, tok = loaded
    context = context_text(10, 60)
    base = pc.answer(model, tok, context, QUESTION, pc.ParallelCompConfig(chunk_size=100, keep_chunks=2),
                       max_new_tokens=2, trace=True)
    evict = pc.answer(model, tok, context, QUESTION, pc.ParallelCompConfig(chunk_size=100, keep_chunks=2,
                        kv_capacity=25), max_new_tokens=2, trace=True)
    torch.testing.assert_close(evict.trace["chunk_scores"], base.trace["chunk_scores"], atol=1e-6, rtol=0)
    for layer in range(4):
        kept = evict.trace[f"kv_kept.{layer}"]
        assert kept.shape == (model.args.n_kv_heads, 1 + 2 * 25)
        assert (kept[:, 0] == -1).all() and (kept[:, 1:] >= 0).all()  # one BOS, then context offsets
        for row in kept:
            assert set(row[1:].tolist()) <= set(base.trace[f"kv_kept.{layer}"][0].tolist())


# ----------------------------------------------------------------------------------------------------
# Stage 6: calibration

def planted_cache(region_size=4):
    """Two kept chunks of 1 + 12 tokens (chunk 2 without BOS): 25 cached tokens, 2 layers, 2 KV heads.
    Token 15 (chunk 2, position 3: the sink region) has a key aligned with every query: attention ~1."""
    torch.manual_seed(0)
    hkv, hd, n_layers = 2, 8, 4
    chunks = []
    for i, (start, end) in enumerate([(0, 12), (12, 24)]):
        keys = [torch.randn(hkv, 13, hd) * 0.1 for _ in range(n_layers)]
        values = [torch.randn(hkv, 13, hd) for _ in range(n_layers)]
        kept = [torch.arange(13).expand(hkv, -1) for _ in range(n_layers)]
        chunks.append(pc.EncodedChunk(i, start, end, 0.0, keys, values, kept))
    for layer in range(n_layers):
        chunks[1].keys[layer][:, 3] = 10.0  # cached index 13 + 3 - 1 = 15 after dropping chunk 2's BOS
    return chunks, hkv, hd, n_layers


@pytest.mark.parametrize("rule,evicted_layers", [(("sink", 2, 3), {1, 2}), (("recent", 1, 4), set()),
                                                 (("all", 4, 4), {3})])
def test_planted_sink_token_is_evicted_only_where_its_rule_applies(rule, evicted_layers):
    chunks, hkv, hd, n_layers = planted_cache()
    cfg = pc.ParallelCompConfig(calibration=[rule], region_size=4, calibration_threshold=0.1)
    cache, m = pc.assemble_cache(chunks, 1)
    assert m == 13 and cache.length == 25 and cache.offset[0][0, 15] == 14  # offset into context ids
    q = torch.ones(1, 4, 3, hd)  # 4 query heads, 3 question tokens: they all attend to the planted key
    hook = pc.Calibration(cache, cfg)  # the question's prefill goes through it
    for layer in range(n_layers):
        keys, _ = hook.update(layer, q, torch.zeros(1, hkv, 3, hd), torch.zeros(1, hkv, 3, hd))
        planted_present = bool((keys[0, :, :-3] == 10.0).all(-1).any())
        assert planted_present == (layer not in evicted_layers), layer
        # every head drops the same count (rectangular K/V); here exactly the planted token
        assert keys.shape[2] == 25 + 3 - (layer in evicted_layers)
        assert (14 in cache.offset[layer][0].tolist()) == (layer not in evicted_layers)
    # decoding goes through the cache itself: the evicted token stays out
    for layer in range(n_layers):
        keys, _ = cache.update(layer, q[:, :, :1], torch.zeros(1, hkv, 1, hd), torch.zeros(1, hkv, 1, hd))
        assert bool((keys[0] == 10.0).all(-1).any()) == (layer not in evicted_layers)
        assert keys.shape[2] == 25 + 4 - (layer in evicted_layers)


def test_bias_token_keep_equalises_counts_per_head():
    scores = torch.tensor([[0.5, 0.2, 0.01, 0.3, 0.02], [0.01, 0.03, 0.6, 0.04, 0.02]])
    keep = pc.bias_token_keep(scores, torch.ones_like(scores, dtype=torch.bool), 0.1)
    # head 0 flags three tokens (0.5, 0.2, 0.3); head 1 flags one (0.6) and drops its two lowest (0.01, 0.02)
    assert keep.tolist() == [[2, 4], [1, 3]]
    region = torch.tensor([[False, True, True, True, True]] * 2)
    # outside the region a high score is kept (token 0 of head 0); head 1 then drops one extra token
    assert pc.bias_token_keep(scores, region, 0.1).tolist() == [[0, 2, 4], [1, 3, 4]]


def test_regions_are_per_chunk():
    pos = torch.tensor([[0, 1, 5, 8, 9]])
    chunk_len = torch.full_like(pos, 10)
    assert pc.region_mask("sink", pos, chunk_len, 2).tolist() == [[True, True, False, False, False]]
    assert pc.region_mask("recent", pos, chunk_len, 2).tolist() == [[False, False, False, True, True]]
    assert pc.region_mask("middle", pos, chunk_len, 2).tolist() == [[False, False, True, False, False]]


def test_calibration_scores_use_a_causal_mask_for_several_rows():
    torch.manual_seed(0)
    q, cached, new = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 3, 4)
    got = pc.calibration_scores(q, cached, new, rows=2)
    keys = torch.cat([cached, new], 2)[0, 0]  # (8, 4)
    per_head = torch.zeros(2, 5)
    for head in range(2):
        for row, visible in ((1, 7), (2, 8)):  # question rows 1 and 2 see 5 + row + 1 keys
            probs = torch.softmax(q[0, head, row] @ keys[:visible].T / 2.0, -1)
            per_head[head] += probs[:5] / 2
    torch.testing.assert_close(got[0], per_head.amax(0))  # the two query heads share the one KV head


def test_calibration_flags_a_token_when_any_query_head_of_its_group_exceeds_lambda():
    """GQA, 4 query heads on one KV head: one head puts 0.3 on cached token 0, three put 0.005. A group mean
    (0.079) would keep it at lambda = 0.1; the released code scores per query head and evicts it, and so do we."""
    hd, s = 4, 20  # the other 19 cached tokens and the question's own key share the rest: < 0.1 each
    cached = torch.zeros(1, 1, s, hd)
    cached[0, 0, 0, 0] = 1.0  # only token 0 has a key the queries can favour
    new = torch.zeros(1, 1, 1, hd)
    target = torch.tensor([0.3, 0.005, 0.005, 0.005])  # attention on token 0 per query head
    # with keys k0 = e0, others 0: p0 = e^a / (e^a + s) (s other keys incl. the question's own); solve for a
    a = torch.log(target * s / (1 - target)) * math.sqrt(hd)
    q = torch.zeros(1, 4, 1, hd)
    q[0, :, 0, 0] = a
    scores = pc.calibration_scores(q, cached, new, rows=1)
    assert abs(float(scores[0, 0]) - 0.3) < 1e-5
    keep = pc.bias_token_keep(scores, torch.ones(1, s, dtype=torch.bool), 0.1)
    assert keep.tolist() == [list(range(1, s))]  # exactly token 0 goes


def test_calibration_evicts_before_attention_and_the_logits_equal_a_run_over_the_reduced_cache(loaded):
    """End to end: the rule's layers lose tokens, the others none; and the first logits equal those of the
    question run without calibration over the same assembled cache from which exactly the traced tokens were
    removed by hand. A calibration that removed tokens after the layer attended, or other tokens, fails here."""
    model, tok = loaded
    cfg = pc.ParallelCompConfig(chunk_size=80, keep_chunks=2, calibration=[("all", 1, 2)],
                                calibration_threshold=0.02)
    t = pc.answer(model, tok, context_text(11, 50), QUESTION, cfg, max_new_tokens=1, trace=True).trace
    evicted = [t[f"kv_kept.{layer}"].shape[1] - t[f"calibration_kept.{layer}"].shape[1] for layer in range(4)]
    assert evicted[0] > 0 and evicted[1] > 0 and evicted[2:] == [0, 0], evicted
    header, context, question = t["header_ids"], t["context_ids"], t["question_ids"]
    plain = pc.ParallelCompConfig(chunk_size=80, keep_chunks=2)
    kept, _ = pc.prefill_chunks(model, header, context, question, t["chunk_bounds"].tolist(), plain)
    cache, m = pc.assemble_cache(kept, len(header))
    for layer in range(4):
        offsets, wanted = cache.offset[layer], t[f"calibration_kept.{layer}"]  # (Hkv, S), (Hkv, S')
        keep = torch.stack([torch.tensor([int((offsets[h] == o).nonzero()) for o in wanted[h].tolist()])
                            for h in range(len(wanted))])
        cache.evict(layer, keep)
    logits = pc.prefill_question(model, cache, question, m, plain)
    torch.testing.assert_close(logits, t["first_logits"], atol=1e-5, rtol=0)
    no_calibration = pc.prefill_question(model, pc.assemble_cache(kept, len(header))[0], question, m, plain)
    assert (no_calibration - t["first_logits"]).abs().max() > 1e-3  # the evictions matter


# ----------------------------------------------------------------------------------------------------
# Configuration and decoding

def test_paper_calibration_preset():
    assert pc.paper_calibration(32) == [("middle", 1, 8), ("recent", 9, 16), ("sink", 25, 32)]
    assert pc.paper_calibration(4) == [("middle", 1, 1), ("recent", 2, 2), ("sink", 4, 4)]
    assert parse_calibration("paper", 32) == pc.paper_calibration(32)
    assert parse_calibration("middle:1-8,sink:30", 32) == [("middle", 1, 8), ("sink", 30, 30)]


@pytest.mark.parametrize("kw,message", [
    ({"chunk_size": 0}, "chunk_size"), ({"keep_chunks": -1}, "keep_chunks"), ({"window": 0}, "window"),
    ({"chunk_size": 100, "kv_capacity": 101}, "larger than a chunk"), ({"pool_kernel": 4}, "odd"),
    ({"calibration": [("sink", 1, 9)]}, "outside"), ({"calibration": [("edge", 1, 2)]}, "unknown"),
    ({"calibration_threshold": 0.0}, "threshold"), ({"chunk_batch": 0}, "chunk_batch"),
    ({"calibration": [("sink", 1, 2), ("recent", 2, 3)]}, "two calibration rules")])
def test_nonsense_config_raises(loaded, kw, message):
    model, _ = loaded
    with pytest.raises(pc.ConfigError, match=message):
        cfg = pc.ParallelCompConfig(**kw)
        cfg.validate(model.args)
        cfg.rules_by_layer()


def test_sampling():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert pc.sample(logits, 0.0, 1.0, None) == 1
    g = torch.Generator().manual_seed(0)
    assert {pc.sample(logits, 1.0, 1e-6, g) for _ in range(20)} == {1}  # top-p this small = greedy
    draws = [pc.sample(logits, 1.0, 0.9, g) for _ in range(300)]
    assert set(draws) == {1, 3}  # token 2 lies outside the 0.9 nucleus, token 0 too


def test_sampling_with_seed_is_reproducible(loaded):
    model, tok = loaded
    runs = [pc.answer(model, tok, context_text(12, 30), QUESTION, max_new_tokens=10, temperature=1.0, top_p=0.9,
                        seed=s).ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_stop_tokens_end_generation(loaded):
    """A stop token ends generation wherever it comes (first token, mid-generation), is not emitted, and any
    of several stop ids (Llama 3 has more than one) stops it."""
    model, tok = loaded
    prompt = tok.encode_prompt(context_text(13, 10), QUESTION)
    ids = prompt.header + prompt.context + prompt.question

    def run(stop_ids, n=8):
        with torch.no_grad():
            cache = KVCache(4)
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache)[0, -1]
        return pc.decode(model, cache, logits, len(ids), n, set(stop_ids))

    free = run(set())
    assert len(free) == 8 and free == plain_greedy(model, ids, 8, set())
    assert run({free[0]}) == []
    cut = next(i for i in range(2, 8) if free[i] not in free[:i])  # a token that first appears mid-generation
    assert run({free[cut]}) == free[:cut]
    assert run({free[cut], 10**6}) == free[:cut]  # two stop ids, one never produced
    later = next((i for i in range(cut + 1, 8) if free[i] not in free[:i]), None)
    if later is not None:
        assert run({free[later], free[cut]}) == free[:cut]  # the first of either ends it
