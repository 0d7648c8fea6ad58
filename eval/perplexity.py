"""Perplexity by context length, a fair protocol (the paper's Table 3 question, without an oracle): the perplexity of
a continuation of a long real text given the N tokens before it, for full attention and for ParallelComp's chunk
selection against baselines at the same budget, N = 2K ... 32K.

    python -m eval.perplexity --ckpt DIR --lengths 2k,4k,8k,16k,32k --n 20 --full-limit 16k --out FILE
    python -m eval.perplexity --report FILE

The text is the King James Bible (Debian's bible-kjv), tokenized once. Continuation j of n starts at token at_j,
spread evenly over the text (the same n positions for every N). Around at_j:

    context = ids[at - Q - N : at - Q]   what a method may select from (N tokens)
    query   = ids[at - Q : at]           Q tokens (--query, 64) that every method reads and none is scored on
    scored  = ids[at : at + L]           L tokens (--cont, 128): the score is their mean NLL, the same tokens for
                                         every method, each read after the query

Every method reads the tokenizer's header (its BOS, if it adds one: the same for all methods), its view of the
context, the query, then the scored tokens; the query and the scored tokens continue at the positions after the
longest kept chunk (ParallelComp's stage 5), or after the context (full attention). Methods, all at the same
budget of k chunks (--keep-chunks, 3) of at most --chunk-size tokens:

    full       the N context tokens as one text (ordinary positions; only up to --full-limit: quadratic)
    pc-query   ParallelComp: chunks ranked by the query's NLL given each chunk (I_c of the query), k best kept
    last-k     the k chunks nearest the continuation
    random-k   k chunks drawn at random (seeded by N and j)
    oracle     chunks ranked by the NLL of query + scored tokens: the selection saw the tokens it is scored on,
               an upper bound for selection, not a result (what this file measured before)

One JSON line per (method, N, at_j) with `core`, the commit that ran it, appended as it is done; a rerun skips
those already there (resumable). The starts of --n 2m-1 include those of --n m, so a run can be extended: --n 19
adds 9 continuations to --n 10.
`--report` prints perplexity per (method, N) = exp(mean NLL over the n continuations), with a 95% interval from
the spread of the per-continuation NLLs (normal approximation), and the paired NLL difference of pc-query against
last-k and random-k.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: OpenMP reads it when torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

METHODS = ("full", "pc-query", "last-k", "random-k", "oracle")


def header_ids(tok) -> torch.Tensor:
    """What the tokenizer puts before every text (a BOS or nothing): the same for every method."""
    return torch.tensor([tok.bos_id] if tok.bos_id is not None else [], dtype=torch.long)


def positions_of(at: int, n: int, query: int, cont: int, total: int, count: int) -> list[int]:
    """`count` continuation starts spread evenly over the text, each with room for n + query tokens before it."""
    lo, hi = n + query, total - cont
    if hi < lo:
        raise ValueError(f"the text has {total} tokens: too short for {n} + {query} + {cont}")
    if at >= 0:  # one continuation at a given token
        return [at]
    return [lo + round(j * (hi - lo) / max(count - 1, 1)) for j in range(count)]


@torch.inference_mode()
def nll_full(model, header: torch.Tensor, context: torch.Tensor, query: torch.Tensor, scored: torch.Tensor) -> float:
    """Mean NLL of `scored` after header + context + query, one ordinary forward at positions 0.."""
    ids = torch.cat([header, context, query, scored])
    start = len(ids) - len(scored)  # the index of the first scored token
    rows = torch.arange(start - 1, len(ids) - 1)[None]  # the rows that predict the scored tokens
    logits = model(ids[None], torch.arange(len(ids))[None], None, logits_at=rows)[0]
    return torch.nn.functional.cross_entropy(logits, scored).item()


@torch.inference_mode()
def nll_chunks(model, header: torch.Tensor, context: torch.Tensor, query: torch.Tensor, scored: torch.Tensor,
               bounds: list[tuple[int, int]], rank_by: dict[str, torch.Tensor], cfg) -> dict[str, tuple[float, list[int]]]:
    """Mean NLL of `scored` after ParallelComp's stages 2-4 over the chunks `bounds`, for each selection in
    `rank_by` (name -> the ids whose NLL ranks the chunks): the keep_chunks best kept (with bounds of exactly k
    chunks every chunk is kept), then query + scored read over the assembled cache at positions M, M+1, ...
    The chunks are encoded once for all selections (stage 2 does not depend on what ranks them).
    Returns name -> (NLL, the kept chunks' indices in bounds)."""
    import parallelcomp as pc
    queues = {name: pc.ChunkQueue(cfg.keep_chunks) for name in rank_by}
    for chunk in pc.stream_chunks(model, header, context, bounds, cfg):
        for name, ids in rank_by.items():
            queues[name].push(pc.score_chunk(model, chunk, ids, len(header), cfg))
    fed = torch.cat([query, scored])
    rows = torch.arange(len(query) - 1, len(fed) - 1)[None]
    out = {}
    for name, queue in queues.items():
        cache, m = pc.assemble_cache(queue.kept(), len(header))
        logits = model(fed[None], torch.arange(m, m + len(fed))[None], cache, logits_at=rows)[0]
        out[name] = torch.nn.functional.cross_entropy(logits, scored).item(), [c.index for c in queue.kept()]
    return out


def run_methods(methods: list[str], model, tok, ids: torch.Tensor, at: int, n: int, j: int, args) -> dict[str, dict]:
    """One continuation under each of `methods`: method -> its record's measured part."""
    import dataclasses

    import parallelcomp as pc
    header = header_ids(tok)
    context = ids[at - args.query - n:at - args.query]
    query, scored = ids[at - args.query:at], ids[at:at + args.cont]
    out = {}
    if "full" in methods:
        out["full"] = {"nll": nll_full(model, header, context, query, scored)}
    cfg = pc.ParallelCompConfig(chunk_size=args.chunk_size, keep_chunks=args.keep_chunks, chunk_batch=1)
    bounds = pc.split_chunks(pc.boundary_strength(tok.token_texts)[context], args.chunk_size)
    k = min(args.keep_chunks, len(bounds))
    ranked = {m: query if m == "pc-query" else torch.cat([query, scored]) for m in ("pc-query", "oracle") if m in methods}
    if ranked:  # one encoding of every chunk, two rankings
        for m, (nll, kept) in nll_chunks(model, header, context, query, scored, bounds, ranked, cfg).items():
            out[m] = {"nll": nll, "chunks": len(bounds), "kept": kept}
    for m in ("last-k", "random-k"):
        if m in methods:
            chosen = (list(range(len(bounds) - k, len(bounds))) if m == "last-k"
                      else sorted(random.Random(f"{n}/{j}").sample(range(len(bounds)), k)))
            (nll, _), = nll_chunks(model, header, context, query, scored, [bounds[c] for c in chosen], {m: query},
                                   dataclasses.replace(cfg, keep_chunks=k)).values()
            out[m] = {"nll": nll, "chunks": len(bounds), "kept": chosen}
    return out


def read_records(path: str) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def report(rows: list[dict]) -> str:
    """Markdown: perplexity (95% interval; continuations) per method and N; paired differences of pc-query."""
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["n"]), {})[r["at"]] = r["nll"]  # paired by the start token
    lengths = sorted({n for _, n in by})

    def ppl(nlls: list[float]) -> str:
        mean = sum(nlls) / len(nlls)
        if len(nlls) < 2:
            return f"{math.exp(mean):.2f} (n=1)"
        sd = (sum((x - mean) ** 2 for x in nlls) / (len(nlls) - 1)) ** 0.5
        half = 1.96 * sd / len(nlls) ** 0.5
        return f"{math.exp(mean):.2f} ({math.exp(mean - half):.2f}-{math.exp(mean + half):.2f}; n={len(nlls)})"

    out = ["| method | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for method in METHODS:
        if any((method, n) in by for n in lengths):
            label = method + (" (upper bound: saw the scored tokens)" if method == "oracle" else "")
            out.append(f"| {label} | " + " | ".join(ppl(list(by[(method, n)].values())) if (method, n) in by else ""
                                                      for n in lengths) + " |")
    out += ["", "| pc-query NLL minus | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |",
            "|---|" + "---:|" * len(lengths)]
    for base in ("last-k", "random-k"):
        cells = []
        for n in lengths:
            a, b = by.get(("pc-query", n), {}), by.get((base, n), {})
            d = [a[at] - b[at] for at in sorted(set(a) & set(b))]
            if len(d) < 2:
                cells.append("")
                continue
            mean = sum(d) / len(d)
            half = 1.96 * (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5 / len(d) ** 0.5
            cells.append(f"{mean:+.3f} ({mean - half:+.3f} to {mean + half:+.3f}; n={len(d)})")
        out.append(f"| {base} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Perplexity of continuations by context length (fair protocol).")
    p.add_argument("--ckpt", help="checkpoint folder")
    p.add_argument("--lengths", default="2k,4k,8k,16k,32k", help="context lengths N (tokens)")
    p.add_argument("--n", type=int, default=20, help="continuations per length (default 20)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--full-limit", default="16k", help="longest N for full attention (quadratic; default 16k)")
    p.add_argument("--at", type=int, default=-1, help="one continuation at this token instead of --n spread ones")
    p.add_argument("--query", type=int, default=64, help="query tokens before the continuation, not scored (64)")
    p.add_argument("--cont", type=int, default=128, help="scored continuation tokens (default 128)")
    p.add_argument("--chunk-size", type=int, default=2000, help="ParallelComp chunk size (default 2000)")
    p.add_argument("--keep-chunks", type=int, default=3, help="chunks kept by every selection (default 3)")
    p.add_argument("--out", help="results JSONL to append to (resumable)")
    p.add_argument("--report", metavar="FILE", help="only print the tables of a results file")
    args = p.parse_args(argv)
    try:
        if args.report:
            rows = read_records(args.report)
            print(report(rows) if rows else "(no results)")
            return 0
        from eval.synthetic import parse_lengths
        from eval.tasks import kjv_text
        from model import load_model
        from tokenizer import load_tokenizer
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not args.ckpt or not methods or any(m not in METHODS for m in methods) or args.n < 1:
            raise ValueError(f"give --ckpt, --n >= 1 and methods from {', '.join(METHODS)}")
        lengths, full_limit = parse_lengths(args.lengths), parse_lengths(args.full_limit)[0]
        model, tok = load_model(args.ckpt), load_tokenizer(args.ckpt)
        ids = torch.tensor(tok.encode(kjv_text()), dtype=torch.long)
        starts = positions_of(args.at, max(lengths), args.query, args.cont, len(ids), args.n)
        from eval.run import core_version
        done, core = {(r["method"], r["n"], r["at"]) for r in read_records(args.out)}, core_version()
        for j, at in enumerate(starts):  # continuation-major: a stopped run has every length at about the same n
            for n in lengths:
                todo = [m for m in methods if (m, n, at) not in done and not (m == "full" and n > full_limit)]
                for method, measured in run_methods(todo, model, tok, ids, at, n, j, args).items():
                    rec = {"method": method, "n": n, "j": j, "at": at, "query": args.query, "cont": args.cont,
                           "chunk_size": args.chunk_size, "keep_chunks": args.keep_chunks, "core": core, **measured}
                    rec["ppl"] = math.exp(rec["nll"])
                    if args.out:
                        with open(args.out, "a", encoding="utf-8") as f:
                            f.write(json.dumps(rec) + "\n")
                    print(f"{method:9s} N={n:6d} j={j:2d} ppl {rec['ppl']:8.2f}", file=sys.stderr, flush=True)
        if args.out:
            print(report(read_records(args.out)))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
