"""The report of a bench.py run, from its results.json: results.md and two plots (prefill time and peak memory
against input length). bench.py calls write() after its sweep; `python bench/report.py OUT` remakes them, e.g.
for a sweep that was stopped (results.json is rewritten after every row)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods import FULL, Method  # noqa: E402

GB80_MIB = 80e9 / 2**20  # "fits in 80 GB": 80 * 10^9 bytes = 76,294 MiB
PAPER_TABLE7 = (1317.72, 56.07)  # s: Llama-2-7B-chat, NarrativeQA, one MI210: 1 chunk vs 23 chunks + compression


@dataclass
class Run:
    """results.json: what bench.py ran (setup: its Setup's fields) and the rows it recorded."""
    title: str
    machine: list[str]  # versions and attention backends, as logged
    setup: dict
    keep_chunks: int
    question_tokens: int
    logit_tolerance: float  # 'equal output': max |logit difference| at most this x max(1, max |logit|)
    methods: list[Method]
    rows: list[dict]

    def __post_init__(self):
        self.methods = [Method(**m) for m in self.methods]  # JSON objects to Methods
        self.lengths = sorted({r["tokens"] for r in self.rows})
        self.many = max(m.chunk_batch or 1 for m in self.methods)  # B of the 'pc b=B' methods; 1: none ran

    def row(self, n: int, method: Method, measured: bool = False) -> dict | None:
        r = next((r for r in self.rows if r["tokens"] == n and r["method"] == method.label), None)
        return r if r and (r["measured"] or not measured) else None


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# ----------------------------------------------------------------------------------------------------
# results.md

def table(run: Run, methods: list[Method], cell, unmeasured=lambda r: "-") -> list[str]:
    """A row per length, a column per method: cell(row) of measured rows, unmeasured(row) of the others."""
    lines = ["| tokens | " + " | ".join(m.label for m in methods) + " |", "|---:|" + "---:|" * len(methods)]
    for n in run.lengths:
        rows = [run.row(n, m) for m in methods]
        cells = ["" if r is None else cell(r) if r["measured"] else unmeasured(r) for r in rows]
        lines.append(f"| {fmt_len(n)} | " + " | ".join(cells) + " |")
    return lines


def per_method_tables(run: Run) -> list[str]:
    """Prefill seconds, peak memory, decode, throughput and chunks per forward: a table each."""
    s, first = run.setup, next(r for r in run.rows if r["measured"])

    def secs(r):
        if "prefill_s" not in r:
            return "skipped" if r["note"].startswith("skipped") else "failed"
        full = run.row(r["tokens"], FULL)
        text = f"{r['prefill_s']:.2f}" + ("*" if r.get("extrapolated") else "")
        if r["method"] != FULL.label and full and "prefill_s" in full:
            text += f" ({full['prefill_s'] / r['prefill_s']:.1f}x{'*' if full.get('extrapolated') else ''})"
        return text

    def memory(r):
        reserved = f" / {r['reserved_mib']:.0f}" if "reserved_mib" in r else ""
        return f"{r['peak_mib']:.0f}{reserved} ({r['peak_mib'] - r['baseline_mib']:+.0f})"

    warmup = ("each measurement ran once untimed on the same input first" if s["warmup"] == "same" else
              "one small forward warmed up each process")
    pc = [m for m in run.methods if m != FULL]
    lines = [f"Chunk size {first['chunk_size']} tokens, keep {run.keep_chunks} chunks, KV capacity "
             f"{first['chunk_size'] // 2} (+kv), question {run.question_tokens} tokens, {s['decode_tokens']} decoded "
             f"tokens, {s['dtype']} on {s['device']}" + (f" with {s['threads']} threads" if s["device"] == "cpu"
                                                          else "") + f"; {warmup}.", "",
             "**Prefill seconds** (speedup over full attention; * = extrapolated, not measured)", ""]
    lines += table(run, run.methods, secs, unmeasured=secs)
    mem = "peak GPU memory allocated / reserved" if s["device"] == "cuda" else "peak process RSS"
    lines += ["", f"**Peak memory, MiB**: {mem} (in brackets: the peak above the weights-loaded baseline)", ""]
    lines += table(run, run.methods, memory)
    lines += ["", "**Decode ms/token** (cache in MiB after prefill)", ""]
    lines += table(run, run.methods, lambda r: f"{r['decode_ms_per_token']:.1f} ({r['cache_mib']:.0f})")
    lines += ["", "**Prefill throughput**: counted TFLOP / achieved GFLOP/s (% of the matmul rate "
              "measured in the same process just before and after, the higher)", ""]
    lines += table(run, run.methods, lambda r: f"{r['prefill_tflop']:.2f} / {r['achieved_gflops']:.0f} "
                                               f"({100 * r['of_matmul']:.0f}%)")
    if pc:
        lines += ["", "**Chunks per forward** as run (forwards x chunks in each; b=B runs at most B at once, "
                  "and there may be fewer chunks than that)", ""]
        lines += table(run, pc, lambda r: r["chunks_per_forward"] or "-")
    return lines


def many_vs_one(run: Run) -> list[str]:
    """pc b=B against pc b=1, without and with KV eviction: time ratio and bench.py's 'equal output'."""
    if run.many == 1:
        return []
    lines = ["", f"**Many vs one chunk per forward** ({Method(run.many).label} against pc b=1): equal output = the "
             f"same kept chunks and max |logit difference| within {run.logit_tolerance:g} x max(1, max |logit|) "
             f"({run.setup['dtype']}); 'near tie' = the kept chunks differ and the chunk scores moved by at least "
             "half their gap at the keep boundary (random weights give near-tied scores)", "",
             "| tokens | b=1 / b=B time | equal output: logit diff (tolerance); score diff (gap at keep) "
             "| b=1 / b=B time (+kv) | equal output (+kv) |", "|---:|---:|---|---:|---|"]
    for n in run.lengths:
        cells = []
        for kv in (False, True):
            one, mb = run.row(n, Method(1, kv), True), run.row(n, Method(run.many, kv), True)
            if one and mb and "equal_output" in mb:
                cells += [f"{one['prefill_s'] / mb['prefill_s']:.2f}x",
                          f"{mb['equal_output']}: {mb['max_logit_diff_vs_b1']:.1e} ({mb['logit_tolerance']:.1e}); "
                          f"{mb['max_score_diff_vs_b1']:.1e} ({mb['score_gap_at_keep']:.1e})"]
            else:
                cells += ["-", "-"]
        lines.append(f"| {fmt_len(n)} | " + " | ".join(cells) + " |")
    return lines


def table7_line(run: Run) -> list[str]:
    """The paper's Table 7 comparison: 1 chunk in flight, no compression, against b=B with compression."""
    many_kv, parts = Method(run.many, kv_eviction=True), []
    for n in run.lengths if run.many > 1 else []:
        one, mb = run.row(n, Method(1), True), run.row(n, many_kv, True)
        if one and mb:
            parts.append(f"{fmt_len(n)}: {one['prefill_s']:.2f} s vs {mb['prefill_s']:.2f} s "
                         f"({mb['chunks_per_forward']} chunks), {one['prefill_s'] / mb['prefill_s']:.2f}x")
    if not parts:
        return []
    return ["", f"**Table 7 line**: prefill with 1 chunk in flight and no compression (pc b=1) against "
            f"{run.many} chunks per forward with compression ({many_kv.label}): " + "; ".join(parts)
            + f". The paper's Table 7 (Llama-2-7B-chat, NarrativeQA, one AMD MI210 64 GB, 23 chunks): "
            f"{PAPER_TABLE7[0]} s vs {PAPER_TABLE7[1]} s, {PAPER_TABLE7[0] / PAPER_TABLE7[1]:.2f}x."]


def fits_80gb(run: Run) -> list[str]:
    """GPU only: peak allocated and reserved memory against an 80 GB card."""
    if run.setup["device"] != "cuda":
        return []

    def fits(r):
        alloc, res = r["peak_mib"], r.get("reserved_mib", r["peak_mib"])
        verdict = "yes" if res <= GB80_MIB else ("allocated yes, reserved no" if alloc <= GB80_MIB else "no")
        return f"{verdict} ({alloc / 1024:.1f} / {res / 1024:.1f} GiB)"
    return (["", "**Fits in 80 GB?** (peak allocated / reserved against 80 x 10^9 bytes = 76,294 MiB; the CUDA "
             "context, about 0.5 GiB, is not in torch's counts)", ""] + table(run, run.methods, fits))


def memory_growth(run: Run) -> list[str]:
    """Peak memory at the longest length over 16K (or the shortest), per method."""
    ref, top, growth = (16384 if 16384 in run.lengths else run.lengths[0]), run.lengths[-1], []
    for m in run.methods:
        lo, hi = run.row(ref, m, True), run.row(top, m, True)
        if top > ref and lo and hi:
            above = (hi["peak_mib"] - hi["baseline_mib"]) / max(lo["peak_mib"] - lo["baseline_mib"], 1)
            growth.append(f"{m.label} {hi['peak_mib'] / lo['peak_mib']:.2f}x (above baseline: {above:.2f}x)")
    return ["", f"**Peak memory at {fmt_len(top)} over {fmt_len(ref)}**: " + "; ".join(growth) + "."] if growth else []


def failures_and_notes(run: Run) -> list[str]:
    failed = [f"{fmt_len(r['tokens'])} {r['method']}: {r['note']}" for r in run.rows
              if r.get("note", "").startswith("failed")]
    notes = sorted({r["note"] for r in run.rows if r.get("note") and not r["note"].startswith("failed")})
    return ((["", "**Failed rows** (the traceback is in log.txt): " + "; ".join(failed) + "."] if failed else [])
            + (["", "Notes: " + "; ".join(notes) + "."] if notes else []))


def markdown(run: Run) -> str:
    lines = [f"### {run.title}", ""] + [f"    {m}" for m in run.machine] + ([""] if run.machine else [])
    if not any(r["measured"] for r in run.rows):
        lines += ["No row was measured:", ""] + [f"- {fmt_len(r['tokens'])} {r['method']}: {r['note']}"
                                                 for r in run.rows]
    else:
        for section in (per_method_tables, many_vs_one, table7_line, fits_80gb, memory_growth, failures_and_notes):
            lines += section(run)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Plots

def style(m: Method) -> tuple[str, str]:
    """(colour, marker): full black; b=1 blue, b=1 +kv cyan; b=B orange, b=B +kv red."""
    if m.chunk_batch is None:
        return "black", "o"
    if m.chunk_batch == 1:
        return ("tab:cyan", "^") if m.kv_eviction else ("tab:blue", "s")
    return ("tab:red", "D") if m.kv_eviction else ("tab:orange", "v")


def plots(run: Run, out: str) -> list[str]:
    """prefill_time.png and peak_memory.png against input length, log scales; extrapolated times dashed."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    memory = "peak memory, MiB" + (" (GPU allocated)" if run.setup["device"] == "cuda" else " (process RSS)")
    files = []
    for key, ylabel, fname in (("prefill_s", "prefill seconds", "prefill_time.png"),
                               ("peak_mib", memory, "peak_memory.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for m in run.methods:
            color, marker = style(m)
            pts = sorted((r["tokens"], r[key], r["measured"]) for r in run.rows if r["method"] == m.label and key in r)
            meas = [(n, v) for n, v, ok in pts if ok]
            extra = [(n, v) for n, v, ok in pts if not ok]
            if meas:
                ax.plot(*zip(*meas), color=color, marker=marker, label=m.label)
            if extra and meas:
                ax.plot(*zip(*([meas[-1]] + extra)), color=color, marker=marker, linestyle="--", fillstyle="none",
                        label=f"{m.label} (extrapolated)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(run.lengths, [fmt_len(n) for n in run.lengths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")  # (resets the formatters: set them after)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        ax.set(xlabel="input tokens", ylabel=ylabel)
        ax.set_title(run.title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


# ----------------------------------------------------------------------------------------------------
# Main

def write(out: str, with_plots: bool = True, log=print) -> tuple[str, list[str]]:
    """results.md, and the plots where a row was measured and matplotlib is installed: (markdown, plot files)."""
    with open(os.path.join(out, "results.json")) as f:
        run = Run(**json.load(f))
    md = markdown(run)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    try:
        return md, plots(run, out) if with_plots and any(r["measured"] for r in run.rows) else []
    except ImportError:
        log("plots skipped: matplotlib is not installed (pip install -r bench/requirements.txt)")
        return md, []


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", help="a bench.py --out folder (with results.json)")
    p.add_argument("--no-plots", action="store_true", help="results.md only")
    a = p.parse_args()
    print(f"wrote {', '.join(['results.md'] + write(a.out, with_plots=not a.no_plots)[1])} to {a.out}")
