"""The committed golden trace (tests/golden/) is recomputed and compared: integer tensors exactly, float
tensors to 1e-5 (the same machine type gives identical bits; the tolerance only absorbs BLAS differences).
If a deliberate change alters the algorithm's output, regenerate it with tests/golden/make_golden.py."""
import json
import os
import sys

import torch
from safetensors.torch import load_file

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
sys.path.insert(0, HERE)
import make_golden  # noqa: E402


def test_golden_trace_is_reproduced():
    with open(os.path.join(HERE, "input.json"), encoding="utf-8") as f:
        case = json.load(f)
    want = load_file(os.path.join(HERE, "trace.safetensors"))
    got = make_golden.run(case).trace
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        if tensor.is_floating_point():
            torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=0, msg=name)
        else:
            assert torch.equal(got[name], tensor), name


def test_golden_trace_is_complete():
    want = load_file(os.path.join(HERE, "trace.safetensors"))
    n_layers = sum(name.startswith("kv_kept.") for name in want)
    assert n_layers >= 2
    assert {"context_ids", "question_ids", "chunk_bounds", "chunk_scores", "kept_chunks", "generated_ids",
            "first_logits"} <= set(want)
    # every stage left a mark: several chunks, KV eviction, and calibration in the covered layers
    assert len(want["chunk_bounds"]) > len(want["kept_chunks"]) >= 1
    assert any(want[f"calibration_kept.{i}"].shape[1] < want[f"kv_kept.{i}"].shape[1] for i in range(n_layers))
    bounds, kept = want["chunk_bounds"], want["kept_chunks"]
    assert bounds[0, 0] == 0 and bounds[-1, 1] == len(want["context_ids"]) and (bounds[1:, 0] == bounds[:-1, 1]).all()
    lowest = want["chunk_scores"].argsort(stable=True)[:len(kept)]  # the keep rule: lowest I_c
    assert sorted(lowest.tolist()) == kept.tolist()
    before_eviction = len(want["header_ids"]) + sum(int(bounds[c, 1] - bounds[c, 0]) for c in kept)
    for i in range(n_layers):
        kv, cal = want[f"kv_kept.{i}"], want[f"calibration_kept.{i}"]
        assert kv.shape[1] < before_eviction  # KV eviction dropped tokens in every layer
        for head in range(kv.shape[0]):  # calibration only removes tokens that KV eviction kept
            assert set(cal[head].tolist()) <= set(kv[head].tolist()) and (kv[head].diff() > 0).all()
