"""Document sessions against one-shot runs (issue 19): Q questions over one document, measured in one run.

    python bench/session.py --ckpt eval/cache/SmolLM2-135M-Instruct --lengths 16k,64k --questions 20 --oneshot 2

The document is King James Bible text (Debian's bible-kjv) with Q needles "The special magic number for KEY is
N." at spread depths, cut to the length in the model's tokens; question i asks for key i. Each part runs in a
fresh process (peak RSS is per process): the session (encode once, save the cache file, answer Q questions),
loading that cache file, and `--oneshot` one-shot `answer()` runs of the same questions. Every question a
one-shot run answers is checked to give the session's answer. The cost of Q one-shot runs is reported as
Q x the mean one-shot run (the runs are identical in work; --oneshot Q measures all of them).
Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def document(tok, length: int, n_questions: int, seed: int = 0):
    """(text, questions, answers): KJV verses with one needle per question at depths spread over the text."""
    verses = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True).stdout.splitlines()
    rng = random.Random(seed)
    keys = [f"{rng.choice(['red', 'green', 'blue', 'amber'])}-{rng.choice(['lion', 'dove', 'cedar', 'river'])}-{i}"
            for i in range(n_questions)]
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    words, text = 0, []
    for line in verses:  # about 1.3 tokens per word: enough text, then cut by tokens
        text.append(line.strip())
        words += len(line.split())
        if words > length:
            break
    ids = tok.encode("\n".join(text))[:length - 40 * n_questions]
    lines = tok.decode(ids).split("\n")
    for i, (key, value) in enumerate(zip(keys, values)):
        at = round((i + 0.5) / n_questions * len(lines)) + i
        lines.insert(at, f"The special magic number for {key} is {value}.")
    questions = [f"What is the special magic number for {key}? The special magic number for {key} is" for key in keys]
    return "\n".join(lines) + "\n", questions, values


def run_part(args) -> dict:
    import torch
    from model import load_model
    from parallelcomp import ParallelCompConfig, answer, default_chunk_size
    from session import QUESTION_BUDGET, Document
    from tokenizer import load_tokenizer
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.ckpt), load_tokenizer(args.ckpt)
    text, questions, values = document(tok, args.length, args.questions)
    size = args.chunk_size or default_chunk_size(  # the session's default, given to the one-shot runs too
        model.args, len(tok.encode_prompt(text, questions[0]).header), QUESTION_BUDGET, args.max_new_tokens)
    cfg = ParallelCompConfig(chunk_size=size, keep_chunks=1)
    out = {"part": args.part, "length": args.length, "chunk_size": size}
    t0 = time.perf_counter()
    if args.part == "session":
        doc = Document.encode(model, tok, text, cfg, questions=questions, max_new_tokens=args.max_new_tokens)
        out["encode_s"], out["tokens"], out["chunks"] = time.perf_counter() - t0, len(doc.prompt.context), len(doc.chunks)
        out["kv_bytes"] = doc.kv_bytes()
        t1 = time.perf_counter()
        out["cache_bytes"] = doc.save(args.cache)
        out["save_s"] = time.perf_counter() - t1
        answers, seconds = [], []
        for q in questions:
            t2 = time.perf_counter()
            answers.append(doc.answer(q, max_new_tokens=args.max_new_tokens).text)
            seconds.append(time.perf_counter() - t2)
        out.update(question_s=seconds, answers=answers)
    elif args.part == "load":
        doc = Document.load(args.cache, model, tok, text, cfg)
        out["load_s"] = time.perf_counter() - t0
        out["answers"] = [doc.answer(questions[0], max_new_tokens=args.max_new_tokens).text]
    else:
        answers, seconds = [], []
        for q in questions[:args.oneshot]:
            t2 = time.perf_counter()
            answers.append(answer(model, tok, text, q, cfg, max_new_tokens=args.max_new_tokens).text)
            seconds.append(time.perf_counter() - t2)
        out.update(oneshot_s=seconds, answers=answers)
    out["correct"] = [v in a for v, a in zip(values, out["answers"])]
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def markdown(rows: list[dict], n_q: int) -> str:
    lines = [f"| tokens | chunks (size) | session: encode + {n_q} questions | per extra question (share of encoding) | "
             f"{n_q} one-shot runs (n measured) | ratio | peak RSS session / one-shot | K/V held | cache file | "
             "load | correct session / one-shot |", "|" + "---:|" * 11]
    for length in sorted({r["length"] for r in rows}):
        s, lo, o = ({r["part"]: r for r in rows if r["length"] == length}[p] for p in ("session", "load", "oneshot"))
        per_q = sum(s["question_s"]) / len(s["question_s"])
        session_s = s["encode_s"] + sum(s["question_s"])
        oneshot_s = n_q * sum(o["oneshot_s"]) / len(o["oneshot_s"])
        lines.append(f"| {s['tokens']:,} | {s['chunks']} ({s['chunk_size']:,}) | {session_s:.1f} s | {per_q:.2f} s "
                     f"({100 * per_q / s['encode_s']:.1f}%) | {oneshot_s:.1f} s ({len(o['oneshot_s'])}) | "
                     f"{oneshot_s / session_s:.1f}x | {s['peak_rss_mib']:.0f} / {o['peak_rss_mib']:.0f} MiB | "
                     f"{s['kv_bytes'] / 2**20:.0f} MiB | {s['cache_bytes'] / 2**20:.0f} MiB | {lo['load_s']:.1f} s | "
                     f"{sum(s['correct'])}/{len(s['correct'])} / {sum(o['correct'])}/{len(o['correct'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=os.path.join(ROOT, "eval", "cache", "SmolLM2-135M-Instruct"))
    p.add_argument("--lengths", default="16k,64k")
    p.add_argument("--questions", type=int, default=20)
    p.add_argument("--oneshot", type=int, default=2, help="one-shot runs measured (of --questions)")
    p.add_argument("--chunk-size", type=int, help="default: the session's default (trained window - 128 question "
                   "tokens - --max-new-tokens), given to the one-shot runs as well")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "session"))
    p.add_argument("--part", choices=("session", "load", "oneshot"), help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:
        print(json.dumps(run_part(args)))
        return 0
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.lengths.split(","):
            length = int(spec[:-1]) * 1024 if spec.endswith("k") else int(spec)
            for part in ("session", "load", "oneshot"):
                argv = [sys.executable, __file__, "--part", part, "--length", str(length),
                        "--cache", os.path.join(tmp, f"{length}.pcdoc")]
                argv += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                         if k in ("ckpt", "questions", "oneshot", "chunk_size", "max_new_tokens", "threads") and v is not None]
                row = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
                rows.append(row)
                print(part, length, {k: v for k, v in row.items() if k != "answers"}, file=sys.stderr, flush=True)
            same = [a == b for a, b in zip(rows[-3]["answers"], rows[-1]["answers"])] + [rows[-2]["answers"][0] == rows[-3]["answers"][0]]
            assert all(same), "a one-shot or loaded answer differs from the session's"
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(rows, args.questions))
    print(markdown(rows, args.questions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
