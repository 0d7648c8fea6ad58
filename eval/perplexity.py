"""Perplexity by context length (the paper's Table 3 protocol): the perplexity of a fixed continuation of a long
real text given the N tokens before it, for full attention and for ParallelComp, N = 2K ... 64K.

    python -m eval.perplexity --ckpt DIR --lengths 2k,4k,8k,16k,32k,64k [--full-limit 16k] [--out FILE]

The text is the King James Bible (Debian's bible-kjv), tokenized once; the continuation is the --cont tokens
starting at token --at, the same for every N. Scored: every continuation token but the first, so both methods
predict the same tokens from inside the continuation.

How ParallelComp picks its chunks here: the N context tokens are cut into chunks as for a question, and the
continuation itself plays the question: chunks are ranked by the continuation's NLL given each chunk alone,
the best --keep-chunks kept, and the continuation then reads the assembled cache. The selection has seen the
tokens it is scored on, so this perplexity is optimistic (an oracle choice of context), as in the paper's
setting; what it shows is that reading kept chunks at reused positions does not degrade with N.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch


@torch.inference_mode()
def nll_full(model, ids: torch.Tensor, n_ctx: int) -> float:
    """Mean NLL of ids[n_ctx + 1:] given everything before, in one ordinary forward at positions 0.."""
    n = len(ids)
    rows = torch.arange(n_ctx, n - 1)[None]  # the rows that predict continuation tokens 1..L-1
    logits = model(ids[None], torch.arange(n)[None], None, logits_at=rows)[0]
    return torch.nn.functional.cross_entropy(logits, ids[n_ctx + 1:]).item()


@torch.inference_mode()
def nll_parallelcomp(model, tok, context: torch.Tensor, cont: torch.Tensor, cfg) -> tuple[float, dict]:
    """Mean NLL of cont[1:] after ParallelComp's stages 1-4 with `cont` as the question (see the module doc)."""
    import parallelcomp as pc
    strength = pc.boundary_strength(tok.token_texts)[context]
    header = torch.tensor([tok.bos_id] if tok.bos_id is not None else [], dtype=torch.long)
    bounds = pc.split_chunks(strength, cfg.chunk_size)
    kept, scores = pc.prefill_chunks(model, header, context, cont, bounds, cfg)
    cache, m = pc.assemble_cache(kept, len(header))
    positions = torch.arange(m, m + len(cont))[None]
    logits = model(cont[None], positions, cache, logits_at=torch.arange(len(cont) - 1)[None])[0]
    info = {"chunks": len(bounds), "kept": [c.index for c in kept]}
    return torch.nn.functional.cross_entropy(logits, cont[1:]).item(), info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Perplexity of a fixed continuation by context length.")
    p.add_argument("--ckpt", required=True, help="checkpoint folder")
    p.add_argument("--lengths", default="2k,4k,8k,16k,32k,64k", help="context lengths N (tokens)")
    p.add_argument("--full-limit", default="16k", help="longest N for full attention (quadratic; default 16k)")
    p.add_argument("--at", type=int, default=70_000, help="first continuation token in the text (70000)")
    p.add_argument("--cont", type=int, default=256, help="continuation tokens (default 256)")
    p.add_argument("--chunk-size", type=int, default=2000, help="ParallelComp chunk size (default 2000)")
    p.add_argument("--keep-chunks", type=int, default=3, help="ParallelComp chunks kept (default 3)")
    p.add_argument("--out", help="append one JSON line per (method, N) to this file")
    args = p.parse_args(argv)
    try:
        from eval.synthetic import parse_lengths
        from eval.tasks import kjv_text
        from model import load_model
        from parallelcomp import ParallelCompConfig
        from tokenizer import load_tokenizer
        lengths, full_limit = parse_lengths(args.lengths), parse_lengths(args.full_limit)[0]
        if max(lengths) > args.at:
            raise ValueError(f"--at ({args.at}) must be at least the longest length ({max(lengths)})")
        model, tok = load_model(args.ckpt), load_tokenizer(args.ckpt)
        ids = torch.tensor(tok.encode(kjv_text()), dtype=torch.long)
        if args.at + args.cont > len(ids):
            raise ValueError(f"the text has {len(ids)} tokens; --at + --cont must fit in it")
        cont = ids[args.at:args.at + args.cont]
        cfg = ParallelCompConfig(chunk_size=args.chunk_size, keep_chunks=args.keep_chunks, chunk_batch=1)
        print("| N | full attention | ParallelComp |\n|---:|---:|---:|", flush=True)
        for n in lengths:
            ctx = ids[args.at - n:args.at]
            rows = {}
            if n <= full_limit:
                rows["full"] = (nll_full(model, torch.cat([ctx, cont]), n), {})
            rows["parallelcomp"] = nll_parallelcomp(model, tok, ctx, cont, cfg)
            for method, (nll, info) in rows.items():
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"method": method, "n": n, "nll": nll, "ppl": math.exp(nll), **info})
                                + "\n")
            cell = lambda m: f"{math.exp(rows[m][0]):.2f}" if m in rows else "not run"  # noqa: E731
            print(f"| {n:,} | {cell('full')} | {cell('parallelcomp')} |", flush=True)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
