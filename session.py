"""One document, many questions (SPEC.md, "One document, many questions"): a side file that composes the stages of
parallelcomp.py and differs from a one-shot run only in what it caches.

Causal attention means a chunk's own keys and values (header + chunk tokens) never see the question, so
`Document` runs stage 2 (parallelcomp.stream_chunks) once and keeps every chunk's K/V; `Document.answer` then runs
stages 3-7 for one question exactly as parallelcomp.answer does (same I_c, kept chunks, kept KV positions,
calibration and tokens: the same functions on the same tensors). What a question changes is checked, not assumed:
its prompt must tokenize to the document's header and context ids (tokenizer.encode_prompt encodes the three
parts apart, so only a chat template that puts question text before the context is refused, with one line).

The price is memory: every chunk's K/V, O(N), where a one-shot run keeps k chunks. With KV eviction the full
chunk K/V is kept and each question's eviction selects from it.

The cache file (`save`, `load`) is safetensors: per chunk `k.C` / `v.C` [L, Hkv, T, hd], `q.C` [L, H, w, hd]
(the tail queries of stage 3), `logits.C` [vocab], plus `header_ids`, `context_ids`, `chunk_bounds` [C, 2];
its metadata names what it belongs to (model fingerprint, dtype, chunk settings, a hash of the text), and a file
that does not match is refused with one line saying which. Nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import parallelcomp as pc

FORMAT = "parallelcomp-document-1"
QUESTION_BUDGET = 128  # question tokens the default chunk size leaves room for, when no question is known yet


class CacheError(pc.ConfigError):
    """A cache file that cannot be used; the message says which and what to do."""


def model_fingerprint(model) -> str:
    """What identifies the weights without reading them all: the config and a sample of every layer's tensors."""
    h = hashlib.sha256(repr(model.args).encode())
    for name, p in model.state_dict().items():
        h.update(name.encode() + p.flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def text_hash(context: str, chat: bool, instruction: str) -> str:
    return hashlib.sha256(json.dumps([context, chat, instruction]).encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Document:
    """A long text read once: the header, the context ids, the chunk bounds and every chunk's ChunkKV."""

    def __init__(self, model, tokenizer, prompt: pc.Prompt, chunks: list[pc.ChunkKV], context: str, chat: bool,
                 instruction: str, encode_s: float = 0.0):
        self.model, self.tokenizer, self.prompt, self.chunks = model, tokenizer, prompt, chunks
        self.context, self.chat, self.instruction, self.encode_s = context, chat, instruction, encode_s

    @classmethod
    def encode(cls, model, tokenizer, context: str, config: pc.ParallelCompConfig | None = None, chat: bool = False,
               instruction: str = "", questions: list[str] = (), max_new_tokens: int = 32, progress=None):
        """Stages 1-2 once. The document's ids are those of the prompt with the first of `questions` that fits
        the window (every question is checked against them). A default chunk size leaves room for questions of
        QUESTION_BUDGET tokens (or that first one, if longer) and max_new_tokens."""
        for probe in [*questions, "\n"]:
            try:
                prompt = pc.prepare(model, tokenizer, context, probe, config, chat, instruction, max_new_tokens)
                break
            except pc.ConfigError as e:
                if e.about != "question":
                    raise
        if config is None or config.chunk_size is None:
            n_q = max(QUESTION_BUDGET, len(prompt.question))
            size = pc.default_chunk_size(model.args, len(prompt.header), n_q, max_new_tokens)
            prompt.cfg = dataclasses.replace(prompt.cfg, chunk_size=size)
        t0 = time.perf_counter()
        bounds = pc.split_chunks(prompt.strength, prompt.cfg.chunk_size)
        chunks = list(pc.stream_chunks(model, prompt.header, prompt.context, bounds, prompt.cfg, progress))
        return cls(model, tokenizer, prompt, chunks, context, chat, instruction, pc.elapsed(t0, prompt.context.device))

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return [(c.start, c.end) for c in self.chunks]

    def kv_bytes(self) -> int:
        tensors = [t for c in self.chunks for t in c.keys + c.values + c.tail_queries]
        return sum(t.numel() * t.element_size() for t in tensors)

    def question_ids(self, question: str) -> torch.Tensor:
        """The question's ids, from the whole prompt encoded as a one-shot run encodes it; refused when that
        prompt's header or context ids are not the document's."""
        ids = self.tokenizer.encode_prompt(self.context, question, self.chat, self.instruction)
        if ids.header != self.prompt.header.tolist() or ids.context != self.prompt.context.tolist():
            raise pc.ConfigError("this question changes the document's tokens (the chat template puts question "
                                 "text before the context); ask it without a session", about="question")
        q = torch.tensor(ids.question, dtype=torch.long, device=self.prompt.context.device)
        pc.check_prompt(self.model.args, self.prompt.header, self.prompt.context, q)
        return q

    def answer(self, question: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, config: pc.ParallelCompConfig | None = None, on_text=None,
               trace: bool = False) -> pc.Result:
        """Stages 3-7 for one question over the cached chunks, as parallelcomp.answer runs them. `config` may
        change what is chosen per question (keep_chunks, kv_capacity, calibration), not the chunks."""
        cfg = self.prompt.cfg if config is None else dataclasses.replace(
            config, chunk_size=self.prompt.cfg.chunk_size, window=self.prompt.cfg.window)
        cfg.validate(self.model.args)
        q = self.question_ids(question)
        prompt = dataclasses.replace(self.prompt, question=q, cfg=cfg)
        t0, n_header = time.perf_counter(), len(prompt.header)
        kept, scores = pc.keep_best(self.model, self.chunks, q, n_header, cfg)
        cache, logits, next_pos = pc.read_question(self.model, kept, n_header, q, cfg)
        info = {"bounds": self.bounds, "scores": scores, "kept": [c.index for c in kept], "cache": cache}
        prefill_s = pc.elapsed(t0, logits.device)
        return pc.finish(self.model, self.tokenizer, prompt, cache, logits, next_pos, info, prefill_s,
                         max_new_tokens, temperature, top_p, seed, on_text, trace)

    # ------------------------------------------------------------------------------------------------
    # The cache file

    def identity(self) -> dict[str, str]:
        cfg = self.prompt.cfg
        return {"format": FORMAT, "model": model_fingerprint(self.model), "dtype": str(self.chunks[0].keys[0].dtype),
                "chunk settings": json.dumps({"chunk_size": cfg.chunk_size, "window": cfg.window}),
                "text": text_hash(self.context, self.chat, self.instruction)}

    def save(self, path: str) -> int:
        """Write the cache file atomically (a temporary name in the same folder, then a rename), so an
        interrupted save never leaves a half file under `path`. Returns its size in bytes."""
        tensors = {"header_ids": self.prompt.header.cpu(), "context_ids": self.prompt.context.cpu(),
                   "chunk_bounds": torch.tensor(self.bounds, dtype=torch.long)}
        for c in self.chunks:
            tensors.update({f"k.{c.index}": torch.stack(c.keys).cpu(), f"v.{c.index}": torch.stack(c.values).cpu(),
                            f"q.{c.index}": torch.stack(c.tail_queries).cpu(), f"logits.{c.index}": c.last_logits.cpu()})
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata=self.identity())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a cache file gets the usual mode
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return os.path.getsize(path)

    @classmethod
    def load(cls, path: str, model, tokenizer, context: str, config: pc.ParallelCompConfig | None = None,
             chat: bool = False, instruction: str = ""):
        """Read a cache file written by `save` for this model, dtype, chunk settings and text; anything else is
        refused with one line (CacheError) and never used."""
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                meta = json.loads(f.read(header_len)).get("__metadata__") or {}
            tensors = load_file(path)
        except FileNotFoundError:
            raise CacheError(f"cache file {path} not found") from None
        except (OSError, ValueError, SafetensorError, MemoryError, OverflowError) as e:
            raise CacheError(f"cache file {path} is damaged or not a document cache ({str(e)[:120]}); "
                             "delete it and encode the document again") from None
        if meta.get("format") != FORMAT:
            raise CacheError(f"{path} is not a {FORMAT} cache file; encode the document again")
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        cfg = config or pc.ParallelCompConfig()
        settings = json.loads(meta.get("chunk settings", "{}"))
        want = {"model": model_fingerprint(model), "dtype": str(dtype), "text": text_hash(context, chat, instruction)}
        for key, what in (("dtype", f"another dtype ({meta.get('dtype')})"), ("model", "another checkpoint"),
                          ("text", "another text (prompt file, --instruction or --chat)")):
            if meta.get(key) != want[key]:
                raise CacheError(f"{path} was written for {what}; encode the document again (--save-cache)")
        for key in ("chunk_size", "window"):
            if getattr(cfg, key) not in (None, settings.get(key)):
                raise CacheError(f"{path} was written with {key} {settings.get(key)}, not {getattr(cfg, key)}; "
                                 f"drop the option or encode the document again")
        cfg = dataclasses.replace(cfg, **settings)
        cfg.validate(model.args)
        try:
            header, ids = tensors["header_ids"].to(device), tensors["context_ids"].to(device)
            chunks = [pc.ChunkKV(i, int(s), int(e), list(tensors[f"k.{i}"].to(device)),
                                 list(tensors[f"v.{i}"].to(device)), list(tensors[f"q.{i}"].to(device)),
                                 tensors[f"logits.{i}"].to(device))
                      for i, (s, e) in enumerate(tensors["chunk_bounds"].tolist())]
            check_shapes(model.args, len(header), len(ids), chunks)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CacheError(f"cache file {path} is damaged ({str(e)[:120]}); encode the document again") from None
        prompt = pc.Prompt(header, ids, header.new_zeros(0), cfg, pc.boundary_strength(tokenizer.token_texts)[ids.cpu()])
        return cls(model, tokenizer, prompt, chunks, context, chat, instruction)


def check_shapes(args, n_header: int, n_context: int, chunks: list[pc.ChunkKV]) -> None:
    """Every chunk's tensors as stage 2 makes them, the chunks covering the context once, in order."""
    end = 0
    for c in chunks:
        t = n_header + c.end - c.start
        if c.start != end or c.end <= c.start:
            raise ValueError(f"chunk {c.index} bounds {c.start}-{c.end} do not follow the previous chunk")
        end = c.end
        for k, v in zip(c.keys, c.values):
            if tuple(k.shape) != (args.n_kv_heads, t, args.head_dim) or k.shape != v.shape:
                raise ValueError(f"chunk {c.index} K/V shape {tuple(k.shape)}")
        if len(c.keys) != args.n_layers or len(c.tail_queries) != args.n_layers or c.last_logits.shape != (args.vocab_size,):
            raise ValueError(f"chunk {c.index} has the wrong number of layers or a wrong logits shape")
    if end != n_context:
        raise ValueError(f"the chunks cover {end} of {n_context} context tokens")


def wanted(args) -> bool:
    """Whether generate.py runs a session: --questions-file, --save-cache or --load-cache."""
    return bool(args.questions_file or args.save_cache or args.load_cache)


def check_flags(args, launched: bool) -> None:
    """The session flags generate.py refuses, before anything is read."""
    if launched and wanted(args):
        raise pc.ConfigError("--questions-file, --save-cache and --load-cache run in one process; launch without "
                             "torchrun (README: one document, many questions)")
    if args.save_cache and args.load_cache:
        raise pc.ConfigError("give --save-cache or --load-cache, not both (a loaded cache is already on disk)")
    if args.dump and args.questions_file:
        raise pc.ConfigError("--dump writes one question's trace; use it with --question")


def run_cli(args, context: str, questions: list[str], cfg: pc.ParallelCompConfig, tokenizer, model, device) -> None:
    """generate.py with --questions-file, --save-cache or --load-cache: read the document once (or load it), then
    answer each question. With --questions-file each answer is a JSON line on stdout, flushed as it is done, and
    a question that cannot run gets its own {"question", "error"} line; progress and stats go to stderr."""
    from cli_io import Progress, Stream, print_stats, sampling, write_trace
    if args.load_cache:
        t0 = time.perf_counter()
        doc = Document.load(args.load_cache, model, tokenizer, context, cfg, args.chat, args.instruction)
        doc.encode_s, what = time.perf_counter() - t0, f"loaded from {args.load_cache}"
    else:
        doc = Document.encode(model, tokenizer, context, cfg, args.chat, args.instruction, questions,
                              args.max_new_tokens, Progress(sys.stderr.isatty()))
        what = "encoded"
    print(f"document: {len(doc.prompt.context):,} tokens in {len(doc.chunks)} chunks {what} in {doc.encode_s:.1f} s; "
          f"every chunk's K/V is held: {doc.kv_bytes() / 2**20:.1f} MiB", file=sys.stderr)
    if args.save_cache:
        size = doc.save(args.save_cache)
        print(f"document cache written to {args.save_cache} ({size / 2**20:.1f} MiB)", file=sys.stderr)
    for question in questions:
        if not args.questions_file:
            stream = Stream()
            result = doc.answer(question, config=cfg, on_text=stream, trace=bool(args.dump), **sampling(args))
            stream.finish(result.text)
            print_stats(result.stats, device)
            if args.dump:
                write_trace(result.trace, args.dump)
            continue
        try:
            result = doc.answer(question, config=cfg, **sampling(args))
            line = {"question": question, "answer": result.text}
            s = result.stats
            print(f"question {questions.index(question) + 1}/{len(questions)}: {s['chunks_kept']} of "
                  f"{s['chunks_total']} chunks kept, {s['prefill_s']:.2f} s question prefill, {s['new_tokens']} "
                  f"tokens in {s['decode_s']:.2f} s", file=sys.stderr)
        except pc.ConfigError as e:
            line = {"question": question, "error": " ".join(str(e).splitlines())}
        print(json.dumps(line, ensure_ascii=False), flush=True)
