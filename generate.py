"""Answer a question over a long prompt with ParallelComp, from a Hugging Face checkpoint folder.

    python generate.py --ckpt DIR --prompt-file FILE --question "..."     # 128K tokens on one GPU
    python generate.py                                                   # the built-in passkey demo (CPU)
    torchrun --nproc-per-node 8 generate.py --ckpt DIR ...               # chunk prefill over 8 GPUs (README)

stdout carries only the generated text, streamed; progress and a closing stats block go to stderr.
Bad input ends with one line on stderr and exit code 2; Ctrl-C with exit code 130. Under torchrun only rank 0
writes to stdout, prints stats and errors, and writes --dump.
"""
from __future__ import annotations

import os

# before torch loads OpenMP: idle worker threads must sleep, not spin. With spinning, a busy machine (another
# process on the same cores) made the chunk prefill of a tiny model 18-25x slower (1M tokens: 214 s vs 8.7 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import distributed
from model import CheckpointError, load_args, load_model
from parallelcomp import ConfigError, ParallelCompConfig, answer, parse_calibration
from tokenizer import TextError, load_tokenizer

class UsageError(ValueError):
    """Bad input from the command line or a file; the message says what to do."""


# ----------------------------------------------------------------------------------------------------
# Inputs

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


# ----------------------------------------------------------------------------------------------------
# Main

def make_config(args: argparse.Namespace, n_layers: int) -> ParallelCompConfig:
    """The method's options; a flag left out keeps ParallelCompConfig's default."""
    names = ("chunk_size", "keep_chunks", "kv_capacity", "window", "calibration_threshold", "chunk_batch")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return ParallelCompConfig(calibration=parse_calibration(args.calibration, n_layers), **given)


def prepare(args: argparse.Namespace, first: bool, rank_device: torch.device | None):
    """Check every input and option, then load the model: (context, questions, config, tokenizer, model, device).
    first: this process writes --dump; rank_device: this rank's device under torchrun."""
    if sum(x is not None for x in (args.question, args.question_file, args.questions_file)) > 1:
        raise UsageError("give one of --question, --question-file and --questions-file")
    if args.save_cache and args.load_cache:
        raise UsageError("give --save-cache or --load-cache, not both (a loaded cache is already on disk)")
    if args.dump and args.questions_file:
        raise UsageError("--dump writes one question's trace; use it with --question")
    if args.dump and first:
        check_writable(args.dump)
    prompt = read_prompt(args.prompt_file, args.max_prompt_mb)
    if args.questions_file:  # one question per line, blank lines skipped
        text = read_prompt(args.questions_file, args.max_prompt_mb, "questions file")
        questions = [line.strip() for line in text.splitlines() if line.strip()]
        context = split_question(prompt, questions[0])[0]  # the same context for every line
    else:
        question = args.question
        if args.question_file:
            question = read_prompt(args.question_file, args.max_prompt_mb, "question file")
        elif question is not None:
            check_utf8(question, "--question")
        context, question = split_question(prompt, question)
        questions = [question]
    check_utf8(args.instruction, "--instruction")
    device, dtype = pick_device(args.device, args.dtype)
    model_args = load_args(args.ckpt)  # config.json only: options are checked before any weights are read
    cfg = make_config(args, model_args.n_layers)
    cfg.validate(model_args)
    tokenizer = load_tokenizer(args.ckpt)
    if tokenizer.vocab_size > model_args.vocab_size:
        raise CheckpointError(f"the tokenizer in {args.ckpt} has {tokenizer.vocab_size} tokens but the model only "
                              f"{model_args.vocab_size}; the tokenizer files belong to another model")
    if args.chat:
        tokenizer.chat_parts("?")  # a missing or broken chat template fails here, before the weights load
    if rank_device is not None and device.type == "cuda":
        device = rank_device  # cuda:LOCAL_RANK
    return context, questions, cfg, tokenizer, load_model(args.ckpt, device=device, dtype=dtype), device


def run(args: argparse.Namespace) -> int:
    sessions = args.questions_file or args.save_cache or args.load_cache
    if distributed.launched() and sessions:
        raise UsageError("--questions-file, --save-cache and --load-cache run in one process; launch without "
                         "torchrun (README: one document, many questions)")
    group = rank_device = None
    if distributed.launched():  # under torchrun this process is one rank
        cuda = args.device != "cpu" and torch.cuda.is_available()
        group, rank_device = distributed.setup("cuda" if cuda else "cpu", args.dist_timeout)
    first = distributed.is_first(group)
    with distributed.together(group):  # bad input seen by any rank ends every rank here, before any work
        context, questions, cfg, tokenizer, model, device = prepare(args, first, rank_device)
    if sessions:
        import session
        session.run_cli(args, context, questions, cfg, tokenizer, model, device)
        return 0
    with distributed.together(group):  # every rank stays until rank 0 has decoded and written (or failed)
        respond(args, context, questions[0], cfg, tokenizer, model, device, group)
    return 0


def sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def respond(args, context, question, cfg, tokenizer, model, device, group) -> None:
    """Answer, streaming the text to stdout, then print the stats and write --dump (on rank 0 only)."""
    first, stream = distributed.is_first(group), Stream()
    kw = dict(method=args.method, chat=args.chat, full_max_tokens=args.full_max_tokens, trace=bool(args.dump),
              instruction=args.instruction, progress=Progress(sys.stderr.isatty()) if first else None,
              on_text=stream if first else None, **sampling(args))
    try:
        if group is None:
            result = answer(model, tokenizer, context, question, cfg, **kw)
        else:
            result = distributed.answer(model, tokenizer, context, question, cfg, group=group, **kw)
    except ConfigError as e:
        if e.about == "question" and args.question is None and args.question_file is None:
            raise ConfigError(f"{e} (no --question was given, so the prompt file's last paragraph is the "
                              "question)") from None
        raise
    if result is None:
        return  # another rank decodes
    stream.finish(result.text)
    print_stats(result.stats, device)
    if args.dump:
        from safetensors.torch import save_file
        try:
            save_file(result.trace, args.dump)
        except OSError as e:
            raise UsageError(f"--dump {args.dump}: writing failed ({e.strerror})") from None
        print(f"trace written to {args.dump}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0, 2 for bad input, 130 when interrupted)."""
    argv = sys.argv[1:] if argv is None else argv
    say = print if os.environ.get("RANK", "0") == "0" else lambda *a, **k: None  # torchrun: rank 0 speaks
    try:
        if not argv:
            if importlib.util.find_spec("demo.run") is None:
                raise UsageError("the built-in demo is not in this copy (demo/run.py); "
                                 "pass --ckpt and --prompt-file (see --help)")
            from demo.run import run_demo
            return run_demo()
        return run(build_parser().parse_args(argv))
    except (UsageError, CheckpointError, ConfigError, TextError) as e:  # session.CacheError is a ConfigError
        say("error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # one line, whatever the message
        return 2
    except distributed.RankFailed as e:
        say(f"error: {e}", file=sys.stderr)
        return 2 if e.bad_input else 1
    except torch.OutOfMemoryError:
        say("error: out of memory; lower --chunk-batch, set --kv-capacity, or use a smaller --max-new-tokens",
            file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (e.g. piped into `head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 141
    finally:
        distributed.close()


class _Parser(argparse.ArgumentParser):
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


def build_parser() -> argparse.ArgumentParser:
    d = ParallelCompConfig()
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder: config.json, *.safetensors, tokenizer files")
    p.add_argument("--prompt-file", required=True, help="UTF-8 text file with the long context")
    p.add_argument("--question", help="the question; default: the prompt file's last paragraph")
    p.add_argument("--question-file", help="read the question from this file instead")
    p.add_argument("--questions-file", help="one question per line: the prompt file is read once and each answer is "
                   "a JSON line on stdout (README: one document, many questions)")
    p.add_argument("--save-cache", metavar="PATH", help="write the encoded document (every chunk's K/V) to PATH")
    p.add_argument("--load-cache", metavar="PATH", help="answer from a document cache written by --save-cache")
    p.add_argument("--instruction", default="", help="text before the context that every chunk reads (e.g. the "
                   "task's instructions), not scored as the question; the model reads instruction + prompt + question")
    p.add_argument("--method", choices=["parallelcomp", "full"], default="parallelcomp",
                   help="parallelcomp (default) or full: ordinary attention over the whole input, the baseline")
    p.add_argument("--full-max-tokens", type=number(int, lambda v: v >= 1, "at least 1"),
                   help="with --method full: middle-truncate the input to this many tokens (the paper's FullKV)")
    p.add_argument("--max-new-tokens", type=number(int, lambda v: v >= 1, "at least 1"), default=128, help="tokens to generate at most (128)")
    p.add_argument("--temperature", type=number(float, lambda v: v >= 0, ">= 0"), default=0.0, help="0 = greedy (default), else sampling")
    p.add_argument("--top-p", type=number(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=1.0,
                   help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--seed", type=number(int, lambda v: 0 <= v < 2**63, "in [0, 2^63)"), default=0, help="sampling seed (default 0)")
    p.add_argument("--chunk-size", type=int, help="context tokens per chunk (default: trained window - question - "
                                                  "max new tokens)")
    p.add_argument("--keep-chunks", type=int, help=f"chunks kept after scoring (default {d.keep_chunks}; 1 for retrieval)")
    p.add_argument("--kv-capacity", type=int, help="context tokens kept per chunk by KV eviction (default: no eviction)")
    p.add_argument("--window", type=int, help=f"observation window for KV eviction (default {d.window})")
    p.add_argument("--calibration", default="none",
                   help="none (default), paper, or rules like middle:1-8,recent:9-16,sink:25-32 (1-based layers)")
    p.add_argument("--calibration-threshold", type=float,
                   help=f"attention threshold (default {d.calibration_threshold})")
    p.add_argument("--chunk-batch", type=int, help=f"chunks per forward pass (default {d.chunk_batch})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (instruct models)")
    p.add_argument("--max-prompt-mb", type=number(float, lambda v: v > 0, "positive"), default=64,
                   help="refuse prompt files larger than this many MiB (default 64, about 16M tokens)")
    p.add_argument("--dist-timeout", type=number(float, lambda v: v > 0, "positive"), default=600,
                   help="under torchrun: seconds a rank waits for the others before giving up (default 600)")
    p.add_argument("--dump", help="write the stage-by-stage trace to this .safetensors file (README: trace format)")
    return p


if __name__ == "__main__":
    sys.stdout.reconfigure(errors="replace")  # a console that cannot show a character gets '?', not a crash
    sys.exit(main())
