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
import sys  # noqa: E402

import torch  # noqa: E402

import distributed  # noqa: E402
import session  # noqa: E402
from cli_io import (Parser, Progress, Stream, UsageError, check_writable, make_config, number,  # noqa: E402
                    pick_device, print_stats, read_inputs, sampling, write_trace)
from model import CheckpointError, load_args, load_model  # noqa: E402
from parallelcomp import ConfigError, ParallelCompConfig, answer  # noqa: E402
from tokenizer import TextError, load_tokenizer  # noqa: E402


def prepare(args: argparse.Namespace, first: bool, rank_device: torch.device | None):
    """Check every input and option, then load the model: (context, questions, config, tokenizer, model, device).
    first: this process writes --dump; rank_device: this rank's device under torchrun."""
    if args.dump and first:
        check_writable(args.dump)
    context, questions = read_inputs(args)
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
    session.check_flags(args, distributed.launched())  # before torchrun's process group is joined
    group, rank_device = distributed.start(args)  # (None, None) unless launched by torchrun
    with distributed.together(group):  # bad input seen by any rank ends every rank here, before any work
        context, questions, cfg, tokenizer, model, device = prepare(args, distributed.is_first(group), rank_device)
    if session.wanted(args):
        session.run_cli(args, context, questions, cfg, tokenizer, model, device)
        return 0
    with distributed.together(group):  # every rank stays until rank 0 has decoded and written (or failed)
        respond(args, context, questions[0], cfg, tokenizer, model, device, group)
    return 0


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
        write_trace(result.trace, args.dump)


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


def build_parser() -> argparse.ArgumentParser:
    d = ParallelCompConfig()
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
