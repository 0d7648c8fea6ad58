"""The real-model demo: SmolLM2-135M-Instruct finds a pass key in a 32K-token haystack with ParallelComp
(2,000-token chunks, the chunk kept that makes the question most likely), while full attention over half
that haystack answers something else. A few minutes on 2 CPU cores (`make demo-real`).

    python -m eval.demo_real --ckpt eval/cache/SmolLM2-135M-Instruct [--length 32k] [--full-length 16k]
"""
from __future__ import annotations

import argparse
import os
import sys

from eval.synthetic import parse_lengths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="ParallelComp against full attention on a passkey, with SmolLM2.")
    p.add_argument("--ckpt", required=True, help="the SmolLM2 folder (make model)")
    p.add_argument("--length", default="32k", help="haystack for ParallelComp, in tokens (default 32k)")
    p.add_argument("--full-length", default="16k", help="haystack for full attention (default 16k; 0: skip)")
    p.add_argument("--chunk-size", type=int, default=2000, help="ParallelComp chunk size (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="task seed (default 0)")
    args = p.parse_args(argv)
    try:
        from model import load_model
        from parallelcomp import ParallelCompConfig, answer
        from tokenizer import load_tokenizer
        from eval.tasks import TaskMaker
        length, full_length = parse_lengths(args.length)[0], parse_lengths(args.full_length)[0]
        model, tok = load_model(args.ckpt), load_tokenizer(args.ckpt)
        maker = TaskMaker(tok, args.seed)
        ex = maker.make("passkey", length, 1, 3)  # the needle in the middle
        key = ex["answers"][0]
        print(f"question: {ex['input'].strip()!r}\n(the key is {key})", flush=True)
        cfg = ParallelCompConfig(chunk_size=args.chunk_size, keep_chunks=1, chunk_batch=1)
        res = answer(model, tok, ex["context"], ex["input"], cfg, "parallelcomp", 6, trace=True,
                     instruction=ex["instruction"])
        kept = int(res.trace["kept_chunks"][0])
        print(f" parallelcomp over {ex['length']:>7,} tokens: {res.text.strip()!r:12} "
              f"{'correct' if res.text.strip().startswith(key) else 'wrong':8} {res.stats['prefill_s']:6.1f} s"
              f"   ({res.stats['chunks_total']} chunks of <= {args.chunk_size}; kept chunk {kept}, I_c "
              f"{float(res.trace['chunk_scores'][kept]):.2f}, others "
              f"{float(res.trace['chunk_scores'].median()):.2f} median of all)", flush=True)
        if full_length:
            ex = maker.make("passkey", full_length, 1, 3)
            key = ex["answers"][0]
            res = answer(model, tok, ex["context"], ex["input"], None, "full", 6, instruction=ex["instruction"])
            beyond = ex["length"] > model.args.max_position_embeddings
            print(f"         full over {ex['length']:>7,} tokens: {res.text.strip()!r:12} "
                  f"{'correct' if res.text.strip().startswith(key) else 'wrong':8} {res.stats['prefill_s']:6.1f} s"
                  f"   (key {key}" + ("; past the 8,192 positions the model was trained on)" if beyond else ")"),
                  flush=True)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
