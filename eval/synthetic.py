"""Generated long-context tasks (eval/tasks.py) run over a grid of lengths, one setting at a time.

    python -m eval.synthetic --ckpt DIR --setting pc2k --tasks passkey,niah_single --lengths 4k,16k --n 3 \
        --chunk-size 2000 --keep-chunks 1 --out eval/runs/results.jsonl
    python -m eval.synthetic --write eval/runs/tasks --tasks passkey --lengths 8k --n 5 --ckpt DIR
        # only write the examples as JSONL (for python -m eval.run --benchmark synthetic)

Each example's record is appended to --out as soon as it is done, keyed by (setting, task, length, i, depth); a rerun
skips the keys already there, so a long run can be stopped and resumed. `python -m eval.report` makes the
tables. Lengths are total prompt tokens in the evaluated model's tokenizer; "16k" is 16,384.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from eval.metrics import score_example
from eval.run import RunError, make_config, predict
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


def done_keys(path: str) -> set:
    keys = set()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    keys.add((r["setting"], r["task"], r["target_length"], r["i"], r["depth"]))
    return keys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run generated long-context tasks over a grid of lengths.")
    p.add_argument("--ckpt", required=True, help="checkpoint folder (its tokenizer measures the lengths)")
    p.add_argument("--tasks", default="passkey", help=f"comma-separated, from: {', '.join(TASKS)}")
    p.add_argument("--lengths", default="4k", help="comma-separated prompt lengths in tokens (4k = 4096)")
    p.add_argument("--n", type=int, default=3, help="examples per cell, needles at evenly spread depths (3)")
    p.add_argument("--seed", type=int, default=0, help="task seed (default 0)")
    p.add_argument("--setting", default="", help="label of this setting in the results (default: from flags)")
    p.add_argument("--out", help="results JSONL to append to")
    p.add_argument("--write", metavar="DIR", help="only write the examples to DIR/<task>_<length>.jsonl")
    p.add_argument("--method", choices=("parallelcomp", "full"), default="parallelcomp")
    p.add_argument("--full-max-tokens", type=int, help="full: middle-truncate to this many tokens (FullKV)")
    p.add_argument("--chunk-size", type=int, help="context tokens per chunk (default: from the trained window)")
    p.add_argument("--keep-chunks", type=int, help="chunks kept (default: 1 for single-answer tasks, 3 else)")
    p.add_argument("--kv-capacity", type=int, help="context tokens kept per chunk by KV eviction")
    p.add_argument("--calibration", default="none", help="none | paper | REGION:FIRST-LAST,...")
    p.add_argument("--chunk-batch", type=int, default=1, help="chunks per forward pass (default 1)")
    p.add_argument("--instruction-at", choices=("header", "first", "question"), default="header",
                   help="where ParallelComp reads the task's instruction (see layout(); default header)")
    args = p.parse_args(argv)
    try:
        tasks, lengths = parse_tasks(args.tasks), parse_lengths(args.lengths)
        if args.n < 1:
            raise RunError(f"--n must be at least 1, got {args.n}")
        if not (args.out or args.write):
            raise RunError("give --out (run) or --write (only write the examples)")
        from tokenizer import load_tokenizer
        tok = load_tokenizer(args.ckpt)
        maker = TaskMaker(tok, args.seed)
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
    done = done_keys(args.out)
    model = load_model(args.ckpt)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for task in tasks:
        keep = args.keep_chunks or (3 if task in ("niah_multivalue", "niah_multiquery", "vt") else 1)
        cfg = make_config(argparse.Namespace(**{**vars(args), "keep_chunks": keep}), model.args.n_layers)
        for length in lengths:
            for i in range(args.n):
                ex = maker.make(task, length, i, args.n)
                if (setting, task, length, i, ex["depth"]) in done:
                    continue
                job = {**layout(ex, args.instruction_at), "answers": ex["answers"], "all_classes": None,
                       "letter": None, "max_new_tokens": MAX_NEW_TOKENS[task], "chat_ok": False}
                needle = ex["needles"][0] + len(job["context"]) - len(ex["context"])  # "first" prefixes the context
                rec = predict(model, tok, job, cfg, args.method, args.full_max_tokens, False, needle)
                rec.update(setting=setting, task=task, target_length=length, i=i, length=ex["length"],
                           depth=ex["depth"], method=args.method, keep_chunks=keep,
                           kv_capacity=args.kv_capacity, calibration=args.calibration,
                           full_max_tokens=args.full_max_tokens, instruction_at=args.instruction_at,
                           score=score_example(task, rec["pred"], ex["answers"], benchmark="synthetic"))
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{setting:10s} {task:16s} {length:6d} #{i} score {rec['score']:.2f} {rec['seconds']:6.1f} s "
                      f"{rec['pred'][:50]!r}" + (f" needle chunk rank {rec['needle_rank']}"
                                                 if "needle_rank" in rec else ""), file=sys.stderr, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
