"""What the CLI (generate.py, and session.py's --questions-file) reads and writes, apart from the method: prompt
files under one policy for bytes that are not UTF-8, the question taken from the flag or the prompt's last
paragraph, the device; the flags' parsing (one-line errors, ranges, the --calibration string); the progress
bar, the streamed answer, the closing stats block and the --dump file."""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

import parallelcomp as pc


# ----------------------------------------------------------------------------------------------------
# Inputs

class UsageError(ValueError):
    """Bad input from the command line or a file; the message says what to do."""


def read_prompt(path: str, max_mb: float, what: str = "prompt file") -> str:
    """The file as text. Policy for bytes that are not UTF-8: a few (a file that is mostly UTF-8) are replaced
    with U+FFFD and reported on stderr; a file with NUL bytes (binary, or UTF-16) or mostly undecodable bytes
    is refused, and so is one larger than `max_mb` MiB (at most that much is ever read)."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a directory; give a text file")
    limit = int(max_mb * 2**20)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found") from None
    except OSError as e:
        raise UsageError(f"{what} {path} cannot be read: {e.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {max_mb:g} MiB (about {limit // 4:,} tokens of text); "
                         "give the right file, or raise the limit with --max-prompt-mb")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UsageError(f"{what} {path} is UTF-16; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in data:
        raise UsageError(f"{what} {path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    text = data.decode("utf-8", errors="replace").removeprefix("\ufeff")  # and drop a UTF-8 byte-order mark
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > max(16, len(text) // 10):
        raise UsageError(f"{what} {path} is not text ({bad} undecodable bytes); give a UTF-8 text file")
    if bad:
        print(f"warning: {path} is not valid UTF-8; {bad} undecodable bytes replaced with U+FFFD", file=sys.stderr)
    if not text.strip():
        raise UsageError(f"{what} {path} is empty")
    return text


def check_utf8(text: str, flag: str) -> None:
    """Python hands over command-line bytes that are not UTF-8 as lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{flag} is not valid UTF-8 (check the terminal's encoding, or use a file)") from None


def split_question(prompt: str, question: str | None) -> tuple[str, str]:
    """(context, question). Without --question the prompt's last paragraph (after the last blank line) is the
    question, and everything before it the context. The model reads context + question as one text, so a
    --question that would run on from the file's last word (no white space between them) starts a new line."""
    if question is not None:
        if not question.strip():
            raise UsageError("the question is empty; pass a non-empty --question")
        if not prompt[-1:].isspace() and not question[:1].isspace():
            prompt += "\n"
        return prompt, question
    body = prompt.rstrip()
    cut = body.rfind("\n\n")
    if cut < 0 or not body[:cut].strip():
        raise UsageError("no question given and the prompt has no final paragraph to use as one: "
                         "pass --question or end the prompt file with a blank line and the question")
    return body[:cut + 2], body[cut + 2:]


def read_inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(context, questions) from --prompt-file and --question, --question-file or --questions-file (one question
    per line, blank lines skipped, the same context for every line)."""
    if sum(x is not None for x in (args.question, args.question_file, args.questions_file)) > 1:
        raise UsageError("give one of --question, --question-file and --questions-file")
    prompt = read_prompt(args.prompt_file, args.max_prompt_mb)
    check_utf8(args.instruction, "--instruction")
    if args.questions_file:
        text = read_prompt(args.questions_file, args.max_prompt_mb, "questions file")
        questions = [line.strip() for line in text.splitlines() if line.strip()]
        return split_question(prompt, questions[0])[0], questions
    question = args.question
    if args.question_file:
        question = read_prompt(args.question_file, args.max_prompt_mb, "question file")
    elif question is not None:
        check_utf8(question, "--question")
    context, question = split_question(prompt, question)
    return context, [question]


def pick_device(name: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but this machine has no CUDA GPU that torch can use; use --device cpu")
    device = torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    chosen = getattr(torch, dtype)
    if device.type == "cpu" and chosen == torch.float16:
        raise UsageError("--dtype float16 is not supported on CPU; use float32 (fastest on CPU) or bfloat16")
    if device.type == "cuda" and chosen == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError("--dtype bfloat16: this GPU cannot do bfloat16; use float16")
    return device, chosen


def check_writable(path: str) -> None:
    """Fail before the run, not after it, when the trace file cannot be written."""
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise UsageError(f"--dump {path}: cannot write there ({e.strerror}); give a file path in an existing, "
                         "writable folder") from None
    if not existed:
        os.remove(path)


# ----------------------------------------------------------------------------------------------------
# Flags

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def number(kind, ok, rule: str):
    """An argparse type: a `kind` value for which ok(value) holds, else one line: "must be RULE, got TEXT"."""
    def parse(text: str):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def make_config(args: argparse.Namespace, n_layers: int) -> pc.ParallelCompConfig:
    """The method's options; a flag left out (or absent, as in eval/'s parsers) keeps ParallelCompConfig's default."""
    names = ("chunk_size", "keep_chunks", "kv_capacity", "window", "calibration_threshold", "chunk_batch")
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return pc.ParallelCompConfig(calibration=parse_calibration(args.calibration, n_layers), **given)


def parse_calibration(spec: str, n_layers: int) -> list[tuple[str, int, int]]:
    """'none' | 'paper' | 'middle:1-8,recent:9-16,sink:25-32' (1-based, inclusive layer ranges)."""
    if spec == "none":
        return []
    if spec == "paper":
        return pc.paper_calibration(n_layers)
    rules = []
    for part in spec.split(","):
        try:
            region, layers = part.split(":")
            first, _, last = layers.partition("-")
            rules.append((region.strip(), int(first), int(last or first)))
        except ValueError:
            raise pc.ConfigError(f"calibration rule {part!r} is not REGION:FIRST-LAST (e.g. middle:1-8)") from None
    return rules


def sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


# ----------------------------------------------------------------------------------------------------
# Output

class Progress:
    """Prefill progress over chunks on stderr: a bar on a terminal, else one line per 10% (for logs)."""

    def __init__(self, tty: bool):
        self.tty, self.t0, self.tenths = tty, time.perf_counter(), -1

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            bar = "#" * (30 * done // total)
            sys.stderr.write(f"\rprefill [{bar:<30}] {done}/{total} chunks  {elapsed:.1f}s")
            sys.stderr.write("\n" if done == total else "")
        elif 10 * done // total > self.tenths:
            self.tenths = 10 * done // total
            sys.stderr.write(f"prefill {done}/{total} chunks  {elapsed:.1f}s\n")
        sys.stderr.flush()


class Stream:
    """Writes each newly decoded piece of text to stdout as it is produced. A character split over several
    byte tokens decodes as U+FFFD until its last byte arrives, so trailing U+FFFD wait for the next token;
    `finish` writes whatever is left."""

    def __init__(self):
        self.shown = ""

    def __call__(self, text: str) -> None:
        self.write(text.rstrip("\ufffd"))

    def finish(self, text: str) -> None:
        self.write(text)
        sys.stdout.write("\n")
        sys.stdout.flush()

    def write(self, text: str) -> None:
        if text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU, allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def print_stats(stats: dict, device: torch.device) -> None:
    lines = [f"input tokens      {stats['input_tokens']}"]
    if stats["method"] == "parallelcomp":
        lines.append(f"chunks            {stats['chunks_kept']} kept of {stats['chunks_total']} "
                     f"(chunk size {stats['chunk_size']} tokens)")
    if "ranks" in stats:
        lines.append(f"ranks             {stats['ranks']}: chunk prefill " +
                     ", ".join(f"{t:.2f}" for t in stats["rank_prefill_s"]) + " s; moved to rank 0: "
                     f"{stats['kv_bytes_moved'] / 2**20:.2f} MiB of K/V, {stats['report_bytes']:,} bytes of reports")
    lines += [f"cache             {stats['cache_tokens']} tokens per KV head, {stats['cache_bytes'] / 2**20:.1f} MiB",
              f"prefill           {stats['prefill_s']:.2f} s",
              f"decode            {stats['new_tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s",
              f"peak memory       {peak_memory(device)}"]
    print(f"--- {stats['method']} ---\n" + "\n".join(lines), file=sys.stderr)


def write_trace(trace: dict, path: str) -> None:
    from safetensors.torch import save_file
    try:
        save_file(trace, path)
    except OSError as e:
        raise UsageError(f"--dump {path}: writing failed ({e.strerror})") from None
    print(f"trace written to {path}", file=sys.stderr)
