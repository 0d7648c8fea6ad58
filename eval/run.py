"""Run a checkpoint over LongBench / InfiniteBench JSONL files (their official schemas) or our generated tasks,
and score the predictions with the official metrics.

    python -m eval.run --ckpt DIR --benchmark longbench --data narrativeqa.jsonl hotpotqa.jsonl --out preds/
    python -m eval.run --ckpt DIR --benchmark infinitebench --data passkey.jsonl --keep-chunks 1 --out preds/
    python -m eval.run --ckpt DIR --benchmark synthetic --data tasks.jsonl --out preds/   # eval/tasks.py files
    python -m eval.run --score preds/                                        # (re)score prediction files

Schemas. LongBench: context, input, answers (list), all_classes, dataset, length; the dataset picks the
prompt template and max new tokens (eval/prompts.py). InfiniteBench: context, input, answer (str or list),
options (choice tasks); the dataset is the file's name (passkey.jsonl, kv_retrieval.jsonl, ...), as in its
release. Synthetic: LongBench's schema plus `instruction` (eval/tasks.py), the answer lead in `input`.

The filled template is split into instruction, context and question (prompts.split_prompt): ParallelComp puts
the instruction in the header that every chunk reads, cuts the context into chunks and ends every chunk input
with the question, which scores the chunks; full attention reads the three joined, the official prompt. Each prediction file <out>/<dataset>.jsonl holds one line per
example (pred, answers, score, seconds, ...); <out>/result.json the score per dataset, x100 as the papers print.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from eval import metrics, prompts


class RunError(ValueError):
    """Bad input to the runner; the message says what to fix."""


# ----------------------------------------------------------------------------------------------------
# Reading the benchmark files


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise RunError(f"{path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise RunError(f"{path}:{n} is not JSON ({e.msg})") from None
            if not isinstance(ex, dict):
                raise RunError(f"{path}:{n} is not a JSON object")
            out.append(ex)
    return out


def dataset_of(path: str, ex: dict, benchmark: str) -> str:
    if benchmark == "infinitebench":
        return os.path.basename(path).split(".")[0]
    if "dataset" not in ex:
        raise RunError(f"{path}: an example has no 'dataset' field (LongBench schema)")
    return str(ex["dataset"]).removesuffix("_e")  # LongBench-E files name the dataset with an _e suffix


def to_prompt(ex: dict, dataset: str, benchmark: str) -> dict:
    """The example as one uniform job: instruction, context, question, answers, all_classes, letter, max_new_tokens, chat ok."""
    for key in ("context", "input"):
        if not isinstance(ex.get(key), str):
            raise RunError(f"{dataset}: an example's {key!r} is missing or not a string")
    if benchmark == "synthetic":
        from eval.tasks import MAX_NEW_TOKENS
        if dataset not in MAX_NEW_TOKENS:
            raise RunError(f"unknown synthetic task {dataset!r}; tasks: {', '.join(MAX_NEW_TOKENS)}")
        return {"instruction": ex.get("instruction", ""), "context": ex["context"], "question": ex["input"],
                "answers": list(ex["answers"]),
                "all_classes": None, "letter": None, "max_new_tokens": MAX_NEW_TOKENS[dataset], "chat_ok": False}
    table = prompts.LONGBENCH if benchmark == "longbench" else prompts.INFINITEBENCH
    if dataset not in table:
        raise RunError(f"no {benchmark} template for dataset {dataset!r}; supported: {', '.join(table)}")
    template, max_new = table[dataset]
    fields, letter = dict(ex), None
    if benchmark == "longbench":
        answers = ex.get("answers")
    else:
        answers = ex.get("answer")
        answers = answers if isinstance(answers, list) else [answers]
        if dataset == "longbook_choice_eng":
            options = ex.get("options")
            if not (isinstance(options, list) and len(options) == 4):
                raise RunError(f"{dataset}: an example has no list of 4 'options'")
            fields.update({f"OPTION_{c}": o for c, o in zip("ABCD", options)})
            if answers[0] in options:
                letter = "ABCD"[options.index(answers[0])]
    if not isinstance(answers, list) or not answers:
        raise RunError(f"{dataset}: an example has no ground-truth answers")
    instruction, context, question = prompts.split_prompt(template, fields)
    return {"instruction": instruction, "context": context, "question": question, "answers": [str(a) for a in answers],
            "all_classes": ex.get("all_classes"), "letter": letter, "max_new_tokens": max_new,
            "chat_ok": benchmark == "infinitebench" or dataset not in prompts.LONGBENCH_NO_CHAT}


# ----------------------------------------------------------------------------------------------------
# Running the model


def core_version() -> str:
    """The commit of the code that runs, recorded with results: "+changes" when a .py file differs from it,
    "unknown" outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, check=True).stdout
        head, changed = git("rev-parse", "--short=12", "HEAD").strip(), git("status", "--porcelain", "--", "*.py")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if changed.strip() else "")


def needle_report(tok, context: str, needle_char: int, trace: dict) -> dict:
    """Where the needle went in ParallelComp: its chunk, that chunk's rank by I_c (0 = best) and whether it was
    kept. A wrong answer with the needle chunk kept is a reading error; with it dropped, a ranking error."""
    token = len(tok.encode(context[:needle_char]))
    bounds = trace["chunk_bounds"].tolist()
    chunk = next((i for i, (s, e) in enumerate(bounds) if s <= token < e), len(bounds) - 1)
    order = trace["chunk_scores"].argsort().tolist()
    return {"needle_chunk": chunk, "needle_rank": order.index(chunk),
            "needle_kept": chunk in trace["kept_chunks"].tolist(),
            "chunk_scores": [round(float(x), 3) for x in trace["chunk_scores"]]}


def predict(model, tok, job: dict, cfg, method: str, full_max_tokens=None, chat=False, needle=None) -> dict:
    """Run one job; returns the record written to the prediction file (without the score)."""
    from parallelcomp import answer
    t0 = time.perf_counter()
    want_trace = method == "parallelcomp" and needle is not None
    res = answer(model, tok, job["context"], job["question"], cfg, method, job["max_new_tokens"],
                 full_max_tokens=full_max_tokens, chat=chat and job["chat_ok"], trace=want_trace,
                 instruction=job.get("instruction", ""))
    return make_record(tok, job, res, time.perf_counter() - t0, needle if want_trace else None)


def predict_in_session(doc, tok, job: dict, cfg, needle=None) -> dict:
    """predict() for one question of a document session (session.Document over job's context): the seconds are
    this question's alone (the record's encode_s is the document's one encoding)."""
    t0 = time.perf_counter()
    res = doc.answer(job["question"], job["max_new_tokens"], config=cfg, trace=needle is not None)
    rec = make_record(tok, job, res, time.perf_counter() - t0, needle)
    rec.update(session=True, encode_s=round(doc.encode_s, 2))
    return rec


def make_record(tok, job: dict, res, seconds: float, needle=None) -> dict:
    rec = {"pred": res.text, "answers": job["answers"], "all_classes": job["all_classes"],
           "seconds": round(seconds, 2), "input_tokens": res.stats.get("input_tokens"),
           "chunks_total": res.stats.get("chunks_total"), "chunks_kept": res.stats.get("chunks_kept"),
           "chunk_size": res.stats.get("chunk_size")}
    if needle is not None:
        rec.update(needle_report(tok, job["context"], needle, res.trace))
    return rec


def score_record(dataset: str, rec: dict, benchmark: str) -> float:
    return metrics.score_example(dataset, rec["pred"], rec["answers"], rec.get("all_classes"), benchmark,
                                 rec.get("letter"))


def summarize(out_dir: str) -> dict:
    """Score every <dataset>.jsonl in out_dir again and write result.json: {dataset: score x100 (2 decimals)}."""
    if not os.path.isdir(out_dir):
        raise RunError(f"{out_dir} is not a folder of prediction files")
    result = {}
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".jsonl"):
            continue
        recs = read_jsonl(os.path.join(out_dir, name))
        if not recs:
            continue
        dataset = name[:-len(".jsonl")]
        bench = recs[0].get("benchmark", "longbench")
        scores = [score_record(dataset, r, bench) for r in recs]
        result[dataset] = round(100 * sum(scores) / len(scores), 2)
    with open(os.path.join(out_dir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


def run(args) -> dict:
    import torch
    from model import load_model
    from tokenizer import load_tokenizer
    jobs = []  # (dataset, job, example)
    for path in args.data:
        for ex in read_jsonl(path)[:args.limit]:
            dataset = dataset_of(path, ex, args.benchmark)
            jobs.append((dataset, to_prompt(ex, dataset, args.benchmark), ex))
    if not jobs:
        raise RunError("the data files hold no examples")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = load_model(args.ckpt, device=args.device, dtype=dtype)
    tok = load_tokenizer(args.ckpt)
    from cli_io import make_config
    cfg = make_config(args, model.args.n_layers)
    os.makedirs(args.out, exist_ok=True)
    files = {}
    for dataset, job, ex in jobs:
        if dataset not in files:
            files[dataset] = open(os.path.join(args.out, f"{dataset}.jsonl"), "w", encoding="utf-8")
        needles = ex.get("needles") if args.benchmark == "synthetic" else None
        rec = predict(model, tok, job, cfg, args.method, args.full_max_tokens, args.chat,
                      needles[0] if needles else None)
        rec.update(benchmark=args.benchmark, dataset=dataset, length=ex.get("length"), letter=job["letter"],
                   method=args.method)
        rec["score"] = score_record(dataset, rec, args.benchmark)
        files[dataset].write(json.dumps(rec, ensure_ascii=False) + "\n")
        files[dataset].flush()
        print(f"{dataset:24s} {rec['score']:.2f}  {rec['seconds']:7.1f} s  {rec['pred'][:60]!r}", file=sys.stderr)
    for f in files.values():
        f.close()
    return summarize(args.out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run and score LongBench / InfiniteBench / generated-task files.")
    p.add_argument("--ckpt", help="checkpoint folder")
    p.add_argument("--benchmark", choices=("longbench", "infinitebench", "synthetic"), default="longbench",
                   help="schema and templates of the data files (default: longbench)")
    p.add_argument("--data", nargs="+", default=[], help="JSONL files in the benchmark's schema")
    p.add_argument("--out", help="folder for <dataset>.jsonl predictions and result.json")
    p.add_argument("--score", metavar="DIR", help="only (re)score the prediction files in DIR")
    p.add_argument("--method", choices=("parallelcomp", "full"), default="parallelcomp",
                   help="parallelcomp, or full attention (the baseline; with --full-max-tokens: FullKV with "
                        "middle truncation)")
    p.add_argument("--full-max-tokens", type=int, help="full: middle-truncate the prompt to this many tokens")
    p.add_argument("--chunk-size", type=int, help="context tokens per chunk (default: the trained window minus "
                                                  "the question and the tokens to generate)")
    p.add_argument("--keep-chunks", type=int, default=3, help="chunks kept (default 3; 1 for retrieval tasks)")
    p.add_argument("--kv-capacity", type=int, help="context tokens kept per chunk by KV eviction (default off)")
    p.add_argument("--calibration", default="none", help="none | paper | REGION:FIRST-LAST,... (default none)")
    p.add_argument("--chunk-batch", type=int, default=1, help="chunks per forward pass (default 1: CPU)")
    p.add_argument("--chat", action="store_true", help="apply the chat template (LongBench: not on few-shot "
                                                        "and code datasets, as its pred.py)")
    p.add_argument("--limit", type=int, help="first N examples of each file")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weights dtype (default float32)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.score:
            result = summarize(args.score)
        else:
            if not (args.ckpt and args.data and args.out):
                raise RunError("give --ckpt, --data and --out (or --score DIR)")
            result = run(args)
    except (RunError, KeyError, OSError, ValueError) as e:  # ValueError: CheckpointError, ConfigError from the core
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
