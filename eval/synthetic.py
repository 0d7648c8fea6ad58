"""Generated long-context tasks (eval/tasks.py) run over a grid of lengths, one setting at a time.

    python -m eval.synthetic --ckpt DIR --setting pc2k --tasks passkey,niah_single --lengths 4k,16k --n 3 \
        --chunk-size 2000 --keep-chunks 1 --out eval/runs/results.jsonl
    python -m eval.synthetic --write eval/runs/tasks --tasks passkey --lengths 8k --n 5 --ckpt DIR
        # only write the examples as JSONL (for python -m eval.run --benchmark synthetic)

Each example's record is appended to --out as soon as it is done, keyed by (setting, task, length, i, depth, q); a
rerun skips the keys already there, so a long run can be stopped and resumed. A record holds the prompt's sha256
(instruction + context + question, the text the model reads; not the prompt itself), the prediction, the score,
the seconds, `timing`, the load they were measured under (--timing), and `core`, the commit of the code that ran
(eval.run.core_version). q numbers the questions of a task with several per context (kjv_multi); with --session
the context is encoded once (session.py) and each question runs over it (its seconds are its own; encode_s, the
encoding's, is in every record). --examples runs only some of each cell's n examples (same depths): a timing
sample, e.g. rerun on idle cores into another file. Records written before the hash was added (no prompt_sha256)
are regenerated and hashed by `--backfill-hash` (from the record's task, length, i and depth: the examples are
deterministic); run it only when no job appends to the file.
`python -m eval.report` makes the tables. Lengths are total prompt tokens in the evaluated model's tokenizer;
"16k" is 16,384.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from eval.metrics import score_example
from cli_io import make_config
from eval.report import record_key
from eval.run import RunError, core_version, predict, predict_in_session
from eval.tasks import MAX_NEW_TOKENS, TASKS, TaskError, TaskMaker, write_jsonl


def parse_lengths(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        try:
            out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
        except ValueError:
            raise RunError(f"length {part!r} is not a number of tokens such as 4096 or 4k") from None
    return out


def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise RunError(f"unknown task(s) {', '.join(unknown) or '(none)'}; tasks: {', '.join(TASKS)}")
    return tasks


def parse_examples(spec: str | None, n: int) -> list[int]:
    if spec is None:
        return list(range(n))
    try:
        out = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        raise RunError(f"--examples {spec!r} is not a comma-separated list of example indices such as 0,5") from None
    if not out or out[0] < 0 or out[-1] >= n:
        raise RunError(f"--examples {spec!r}: indices run from 0 to --n minus 1 ({n - 1})")
    return out


def read_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def done_keys(path: str) -> dict:
    """key -> the prompt hash of the record done for it (None for a record from before hashes)."""
    return {record_key(r): r.get("prompt_sha256") for r in read_records(path)}


def questions_of(ex: dict) -> list[dict]:
    """The example's questions: several for kjv_multi, else the one it has."""
    return ex.get("questions") or [{"input": ex["input"], "answers": ex["answers"]}]


def prompt_sha256(ex: dict, question: str) -> str:
    return hashlib.sha256((ex["instruction"] + ex["context"] + question).encode("utf-8")).hexdigest()


def backfill_hashes(path: str, maker) -> int:
    """Add prompt_sha256 to the records of `path` that lack it, from the regenerated example; returns how many.
    Refuses when the file changed while it worked (a job still appending)."""
    before = os.stat(path)
    recs, added = read_records(path), 0
    for r in recs:
        if "prompt_sha256" not in r:
            ex = maker.make_at(r["task"], r["target_length"], r["i"], r["depth"])
            r["prompt_sha256"] = prompt_sha256(ex, questions_of(ex)[r.get("q", 0)]["input"])
            added += 1
    after = os.stat(path)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise RunError(f"{path} changed while its hashes were computed: a job still appends to it; try later")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    os.replace(path + ".tmp", path)
    return added


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run generated long-context tasks over a grid of lengths.")
    p.add_argument("--ckpt", required=True, help="checkpoint folder (its tokenizer measures the lengths)")
    p.add_argument("--tasks", default="passkey", help=f"comma-separated, from: {', '.join(TASKS)}")
    p.add_argument("--lengths", default="4k", help="comma-separated prompt lengths in tokens (4k = 4096)")
    p.add_argument("--n", type=int, default=3, help="examples per cell, needles at evenly spread depths (3)")
    p.add_argument("--examples", help="comma-separated example indices of each cell to run (default: all n)")
    p.add_argument("--seed", type=int, default=0, help="task seed (default 0)")
    p.add_argument("--setting", default="", help="label of this setting in the results (default: from flags)")
    p.add_argument("--out", help="results JSONL to append to")
    p.add_argument("--timing", default="shared CPU", help="the load the seconds are measured under, recorded with "
                                                         "each example (default 'shared CPU'; say 'quiet' only "
                                                         "with nothing else running)")
    p.add_argument("--backfill-hash", action="store_true", help="only add prompt_sha256 to the records of --out "
                                                                "that lack it (regenerated examples)")
    p.add_argument("--write", metavar="DIR", help="only write the examples to DIR/<task>_<length>.jsonl")
    p.add_argument("--method", choices=("parallelcomp", "full"), default="parallelcomp")
    p.add_argument("--full-max-tokens", type=int, help="full: middle-truncate to this many tokens (FullKV)")
    p.add_argument("--chunk-size", type=int, help="context tokens per chunk (default: from the trained window)")
    p.add_argument("--keep-chunks", type=int, help="chunks kept (default: 1 for single-answer tasks, 3 else)")
    p.add_argument("--kv-capacity", type=int, help="context tokens kept per chunk by KV eviction")
    p.add_argument("--calibration", default="none", help="none | paper | REGION:FIRST-LAST,...")
    p.add_argument("--chunk-batch", type=int, default=1, help="chunks per forward pass (default 1)")
    p.add_argument("--session", action="store_true", help="a task with several questions per context (kjv_multi): "
                   "encode the context once (session.py) and answer each question over it")
    p.add_argument("--instruction-at", choices=("header", "first", "question"), default="header",
                   help="where ParallelComp reads the task's instruction (see layout(); default header)")
    args = p.parse_args(argv)
    try:
        tasks, lengths = parse_tasks(args.tasks), parse_lengths(args.lengths)
        if args.n < 1:
            raise RunError(f"--n must be at least 1, got {args.n}")
        args.examples = parse_examples(args.examples, args.n)
        if not (args.out or args.write):
            raise RunError("give --out (run) or --write (only write the examples)")
        from tokenizer import load_tokenizer
        tok = load_tokenizer(args.ckpt)
        maker = TaskMaker(tok, args.seed)
        if args.backfill_hash:
            print(f"{backfill_hashes(args.out, maker)} records hashed", file=sys.stderr)
            return 0
        if args.write:
            os.makedirs(args.write, exist_ok=True)
            for task in tasks:
                for length in lengths:
                    write_jsonl(os.path.join(args.write, f"{task}_{length}.jsonl"),
                                [maker.make(task, length, i, args.n) for i in range(args.n)])
            return 0
        run_grid(args, tok, maker, tasks, lengths)
    except (RunError, TaskError, OSError, ValueError) as e:  # ValueError: CheckpointError, ConfigError from the core
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def layout(ex: dict, instruction_at: str) -> dict:
    """Where ParallelComp gets the task's instruction: "header" (every chunk reads it; the default), "first"
    (plain text before the context: only the first chunk reads it) or "question" (after the context, inside
    the question that scores the chunks). The text the model reads whole is the same for header and first."""
    ins, ctx, q = ex["instruction"], ex["context"], ex["input"]
    if instruction_at == "first":
        return {"instruction": "", "context": ins + ctx, "question": q}
    if instruction_at == "question":
        return {"instruction": "", "context": ctx, "question": "\n" + ins.strip() + " " + q.strip()}
    return {"instruction": ins, "context": ctx, "question": q}


def run_grid(args, tok, maker, tasks, lengths) -> None:
    from model import load_model
    setting = args.setting or (args.method if args.method == "full" else f"pc{args.chunk_size or 'auto'}")
    done, core = done_keys(args.out), core_version()
    model = load_model(args.ckpt)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for task in tasks:
        keep = args.keep_chunks or (3 if task in ("niah_multivalue", "niah_multiquery", "vt") else 1)
        cfg = make_config(argparse.Namespace(**{**vars(args), "keep_chunks": keep}), model.args.n_layers)
        for length in lengths:
            for i in args.examples:
                ex = maker.make(task, length, i, args.n)
                doc = None  # with --session: the example's context, encoded at its first question not yet done
                for q, question in enumerate(questions_of(ex)):
                    doc = run_one(args, model, tok, cfg, setting, task, length, i, keep, ex, q, question, done, doc,
                                  core)


def run_one(args, model, tok, cfg, setting, task, length, i, keep, ex, q, question, done, doc=None, core=None):
    """One question of one example, unless its record exists (then its hash must match the regenerated prompt).
    Returns the example's document session (--session), made here when it is first needed."""
    h = prompt_sha256(ex, question["input"])
    key = (setting, task, length, i, ex["depth"], q)
    if key in done:
        if done[key] not in (None, h):
            raise RunError(f"{args.out} holds {key} for another prompt: the task generator changed; use a new --out")
        return doc
    job = {**layout({**ex, "input": question["input"]}, args.instruction_at), "answers": question["answers"],
           "all_classes": None, "letter": None, "max_new_tokens": MAX_NEW_TOKENS[task], "chat_ok": False}
    needle = ex["needles"][q] + len(job["context"]) - len(ex["context"])  # "first" prefixes the context
    if args.session and args.method == "parallelcomp":
        if doc is None:
            from session import Document
            questions = [layout({**ex, "input": x["input"]}, args.instruction_at)["question"]
                         for x in questions_of(ex)]
            doc = Document.encode(model, tok, job["context"], cfg, instruction=job["instruction"],
                                  questions=questions, max_new_tokens=job["max_new_tokens"])
        rec = predict_in_session(doc, tok, job, cfg, needle)
    else:
        rec = predict(model, tok, job, cfg, args.method, args.full_max_tokens, False, needle)
    rec.update(setting=setting, task=task, target_length=length, i=i, q=q, length=ex["length"],
               depth=ex["depth"], method=args.method, keep_chunks=keep,
               kv_capacity=args.kv_capacity, calibration=args.calibration,
               full_max_tokens=args.full_max_tokens, instruction_at=args.instruction_at, seed=args.seed,
               prompt_sha256=h, timing=args.timing, core=core,
               score=score_example(task, rec["pred"], question["answers"], benchmark="synthetic"))
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"{setting:10s} {task:16s} {length:6d} #{i}.{q} score {rec['score']:.2f} {rec['seconds']:6.1f} s "
          f"{rec['pred'][:50]!r}" + (f" needle chunk rank {rec['needle_rank']}"
                                     if "needle_rank" in rec else ""), file=sys.stderr, flush=True)
    return doc


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
