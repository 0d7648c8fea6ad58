"""Markdown tables from eval.synthetic result files.

    python -m eval.report eval/results/smollm2_n10.jsonl [--settings pc2k,full] [--seconds SAMPLE.jsonl]

One row per (task, setting), one column per length: mean score, n (examples; questions for a task with several
per context) and its 95% Wilson interval, then seconds per example: the mean over the cell's records measured
"quiet" (nothing else running) where it has any, marked "(quiet, n=k)", else over all its records. --seconds
adds a timing sample: reruns of some examples (eval.synthetic --examples --timing quiet) whose seconds count for
their cells and whose prompts and predictions are checked against the results'. Under the table: the load each
setting's seconds were measured under (the records' `timing`; records without one are "not labelled"), so that
seconds from a shared CPU are not read as quiet timings. Below it, where ParallelComp missed: how many misses had the
needle's chunk dropped (a ranking error) and how many kept it and still answered wrong (a reading error).
Records with and without prompt_sha256 (written before it was added) read the same.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist")
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion: successes out of n trials. A mean of fractional scores
    (string_match_all) enters as successes = the sum of the scores, an approximation that the tables name."""
    if n <= 0:
        raise ValueError("an interval needs at least one example")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def record_key(r: dict) -> tuple:
    """A result's identity: (setting, task, length, example, depth, question); eval.synthetic resumes by it."""
    return r["setting"], r["task"], r["target_length"], r["i"], r["depth"], r.get("q", 0)


def check_sample(rows: list[dict], sample: list[dict]) -> str:
    """One line on the timing sample: does each rerun have its result's prompt and prediction?"""
    by_key = {record_key(r): r for r in rows}
    seen = lambda r: (r.get("prompt_sha256"), r["pred"])
    missing = [record_key(r) for r in sample if record_key(r) not in by_key]
    differ = [record_key(r) for r in sample if record_key(r) in by_key and seen(r) != seen(by_key[record_key(r)])]
    out = f"Timing sample: {len(sample)} reruns"
    out += ", every one with its result's prompt and prediction" if not (missing or differ) else ""
    out += f"; not in the results: {missing}" if missing else ""
    return out + (f"; another prompt or prediction than the result's: {differ}" if differ else "")


def table(rows: list[dict], settings: list[str] | None = None, sample: list[dict] = ()) -> str:
    cells, quiet = defaultdict(list), defaultdict(list)
    for r in rows:
        if settings is None or r["setting"] in settings:
            cells[(r["task"], r["setting"], r["target_length"])].append(r)
    timed = {record_key(r) for r in rows if r.get("timing") == "quiet"}  # a sample's rerun of these adds no example
    for r in [*rows, *(r for r in sample if record_key(r) not in timed)]:
        if r.get("timing") == "quiet":
            quiet[(r["task"], r["setting"], r["target_length"])].append(r)
    if not cells:
        return "(no results)"
    lengths = sorted({k[2] for k in cells})
    order = settings or sorted({k[1] for k in cells})
    keys = sorted({(k[0], k[1]) for k in cells}, key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 99))
    head = "| task | setting | " + " | ".join(fmt_len(n) for n in lengths) + " |"
    out = [head, "|---|---|" + "---:|" * len(lengths)]
    for task, setting in keys:
        row = []
        for n in lengths:
            rs = cells.get((task, setting, n))
            if not rs:
                row.append("")
                continue
            row.append(cell(rs, quiet.get((task, setting, n))))
        out.append(f"| {task} | {setting} | " + " | ".join(row) + " |")
    timing = defaultdict(set)
    for k, rs in cells.items():
        for r in quiet.get(k) or rs:
            timing[r["setting"]].add(r.get("timing", "not labelled"))
    out.append("")
    out.append("Seconds measured under: " + "; ".join(f"{s}: {', '.join(sorted(t))}" for s, t in sorted(timing.items())))
    return "\n".join(out)


def cell(rs: list[dict], quiet: list[dict] | None = None) -> str:
    """'100% (n=10; 72-100%) 70 s': mean score, n, 95% Wilson interval, seconds per example; from `quiet`
    records when given: '... 63 s (quiet, n=2)'. Questions asked in a document session (eval.synthetic
    --session) add the documents whose every question was answered right, with their interval (a document's
    questions are not independent) and the encoding's seconds: '5 s a question + 90 s a document'."""
    total = sum(r["score"] for r in rs)
    lo, hi = wilson(total, len(rs))
    ts = quiet or rs
    out = f"{100 * total / len(rs):.0f}% (n={len(rs)}; {100 * lo:.0f}-{100 * hi:.0f}%) "
    if all(r.get("session") for r in rs):  # a document's questions share a haystack: count documents too
        docs = defaultdict(list)
        for r in rs:
            docs[(r["i"], r["depth"])].append(r["score"])
        right = sum(all(x == 1 for x in d) for d in docs.values())
        dlo, dhi = wilson(right, len(docs))
        out += f"[documents all right: {right}/{len(docs)}; {100 * dlo:.0f}-{100 * dhi:.0f}%] "
    out += f"{sum(r['seconds'] for r in ts) / len(ts):.0f} s"
    if all(r.get("session") for r in ts):  # every question of a document records that document's encode_s
        out += f" a question + {sum(r['encode_s'] for r in ts) / len(ts):.0f} s a document"
    return out + (f" (quiet, n={len(ts)})" if quiet else "")


def misses(rows: list[dict]) -> str:
    """ParallelComp's wrong answers split into ranking errors (needle chunk dropped) and reading errors."""
    count = defaultdict(lambda: [0, 0, 0])  # setting -> [examples, ranking errors, reading errors]
    for r in rows:
        if r.get("method") != "parallelcomp" or "needle_kept" not in r:
            continue
        c = count[r["setting"]]
        c[0] += 1
        if r["score"] < 1:
            c[1 if not r["needle_kept"] else 2] += 1
    lines = ["| setting | examples | wrong, needle chunk dropped (ranking) | wrong, needle chunk kept (reading) |",
             "|---|---:|---:|---:|"]
    lines += [f"| {s} | {c[0]} | {c[1]} | {c[2]} |" for s, c in sorted(count.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Markdown tables from eval.synthetic results.")
    p.add_argument("results", nargs="+", help="results JSONL files")
    p.add_argument("--settings", help="comma-separated settings to show, in this order (default: all)")
    p.add_argument("--seconds", nargs="+", default=[], metavar="SAMPLE", help="timing samples: reruns of some "
                   "examples whose quiet seconds stand for their cells")
    args = p.parse_args(argv)
    try:
        rows, sample = load(args.results), load(args.seconds)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    settings = args.settings.split(",") if args.settings else None
    print(table(rows, settings, sample))
    if sample:
        print(check_sample(rows, sample))
    print()
    print(misses([r for r in rows if settings is None or r["setting"] in settings]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
