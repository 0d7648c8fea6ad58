"""The built-in demo (`python generate.py` with no arguments): length extrapolation, shown honestly on CPU.

A tiny Llama (demo/model, trained by demo/train.py on 256-token passkey examples) gets a key hidden in a
haystack hundreds of times longer than anything it saw in training. ParallelComp reads the whole haystack;
full attention gets a shorter excerpt around the same key, because on this input it is quadratic (minutes
on a laptop CPU) and, past a few times the trained window, wrong anyway.
"""
from __future__ import annotations

import os
import random
import sys
import time

import torch

from demo.passkey import make_example
from model import load_model
import parallelcomp as pc
from parallelcomp import ParallelCompConfig
from tokenizer import load_tokenizer

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")


def run_demo(length: int = 131072, full_length: int = 16384, seed: int | None = None) -> int:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    seed = random.SystemRandom().randrange(10**6) if seed is None else seed
    model, tok = load_model(MODEL_DIR), load_tokenizer(MODEL_DIR)
    window = model.args.trained_window
    depth = random.Random(seed).random()
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    say(f"demo (seed {seed}): a 5-digit key hidden at {depth:.0%} depth of a {length:,}-token haystack; "
        f"the model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) was trained on "
        f"{window}-token inputs")
    rows = []
    for method, n_tokens in (("parallelcomp", length), ("full", full_length)):
        context, question, answer = make_example(random.Random(seed), tok, n_tokens, depth)  # same key each time
        say(f"{method}: {n_tokens:,} tokens ...")
        t0 = time.perf_counter()
        result = pc.answer(model, tok, context, question, ParallelCompConfig(keep_chunks=1), method=method,
                          max_new_tokens=8)
        rows.append((method, n_tokens, question, answer, result.text.strip(), time.perf_counter() - t0))
    print(f"question: {rows[0][2].strip()}   (the key is {rows[0][3]})")
    for method, n_tokens, _, answer, text, seconds in rows:
        verdict = "correct" if text == answer else "wrong"
        print(f"{method:>13} over {n_tokens:>7,} tokens ({n_tokens / window:.0f}x the trained window): "
              f"{text!r:>9}  {verdict:<7}  {seconds:5.1f} s")
    print(f"(full attention got a {full_length:,}-token haystack holding the same key: over all {length:,} tokens "
          "it would take minutes here, and it fails beyond a few times the trained window anyway)")
    return 0
