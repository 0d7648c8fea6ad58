"""Regenerate the golden trace that tests/test_golden.py recomputes and compares:

    .venv/bin/python tests/golden/make_golden.py          # writes tests/golden/{input.json,trace.safetensors}

The input is a seeded passkey example from demo/passkey.py (4,096 tokens: 16x the demo model's window) run
through demo/model with KV eviction and the three calibration regions on, so every stage leaves a mark in
the trace. Porters: run the same checkpoint on input.json's context/question/config and compare your
tensors with trace.safetensors (README, "Trace format").
"""
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from demo.passkey import make_example  # noqa: E402
from model import load_model  # noqa: E402
import parallelcomp as pc  # noqa: E402
from parallelcomp import ParallelCompConfig  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

CKPT = os.path.join(ROOT, "demo", "model")
# the paper's calibration preset for 4 layers; threshold and regions scaled down to this tiny model, whose
# attention never exceeds 0.1 in those regions (at 0.03 it evicts 3 middle tokens in layer 1 and still answers
# right; at 0.02 it evicts 8 and misreads one digit)
CONFIG = dict(chunk_size=200, keep_chunks=2, kv_capacity=150, window=8, pool_kernel=7,
              calibration=[["middle", 1, 1], ["recent", 2, 2], ["sink", 4, 4]], calibration_threshold=0.03,
              calibration_rows=1, region_size=32, chunk_batch=4)
MAX_NEW_TOKENS = 8


def run(case: dict, ckpt: str = CKPT):
    """The trace of `case` (input.json's content) on the checkpoint."""
    cfg = dict(case["config"], calibration=[tuple(rule) for rule in case["config"]["calibration"]])
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    return pc.answer(model, tok, case["context"], case["question"], ParallelCompConfig(**cfg),
                    max_new_tokens=case["max_new_tokens"], trace=True)


def main(ckpt: str = CKPT) -> None:
    from safetensors.torch import save_file
    context, question, answer = make_example(random.Random(2025), load_tokenizer(ckpt), 4096, depth=0.6)
    case = {"context": context, "question": question, "answer": answer, "config": CONFIG,
            "max_new_tokens": MAX_NEW_TOKENS}
    result = run(case, ckpt)
    with open(os.path.join(HERE, "input.json"), "w", encoding="utf-8") as f:
        json.dump(case, f, indent=1, ensure_ascii=False)
    save_file({k: v.contiguous() for k, v in result.trace.items()}, os.path.join(HERE, "trace.safetensors"))
    print(f"answer {result.text!r} (expected {answer!r}); kept chunks {result.trace['kept_chunks'].tolist()} "
          f"of {len(result.trace['chunk_bounds'])}")


if __name__ == "__main__":
    main(*sys.argv[1:])
