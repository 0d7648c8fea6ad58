"""Tokenizers for checkpoint folders: SentencePiece `tokenizer.model` (Llama 2, Mistral) or a Hugging Face
`tokenizer.json` (Llama 3/3.1, Qwen2) through the optional `tokenizers` package, behind one interface.

BOS, EOS and every stop token come from the folder's files, never from hard-coded ids. `encode` never adds
special tokens. `encode_prompt` is what ParallelComp feeds the model: the whole prompt text encoded once, as
the model's own tokenizer (transformers) encodes it, and split into header, context and question ids at the
characters where the context begins and ends (see encode_prompt for the rule at the joins).
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from datetime import datetime

from model import CheckpointError


def _json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it") from None
    return data if isinstance(data, dict) else {}


def _token_str(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _chat_template(ckpt_dir: str, tok_cfg: dict) -> str | None:
    """chat_template.jinja first (what transformers 5 saves and reads first), else tokenizer_config.json's
    chat_template: a string, or a list of named templates of which "default" is the one used."""
    path = os.path.join(ckpt_dir, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _fields(data: bytes):
    """(field number, wire type, raw bytes of the whole field) of a serialized protobuf message."""
    i = 0
    while i < len(data):
        start = i
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            n, i = _varint(data, i)
            i += n
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield key >> 3, wire, data[start:i]


def _without_dummy_prefix(model_proto: bytes) -> bytes:
    """The SentencePiece model with NormalizerSpec.add_dummy_prefix (ModelProto field 3, its field 3) off:
    how transformers encodes text that does not start the input (after a special token). Edited on the wire,
    so no protobuf package is needed."""
    out = bytearray()
    for number, wire, raw in _fields(model_proto):
        if number == 3 and wire == 2:
            _, body_start = _varint(raw, 0)
            _, body_start = _varint(raw, body_start)
            body = b"".join(r for n, w, r in _fields(raw[body_start:]) if n != 3) + _put_varint(3 << 3) + b"\x00"
            raw = _put_varint((3 << 3) | 2) + _put_varint(len(body)) + body
        out += raw
    return bytes(out)


def _added_tokens(tok_cfg: dict) -> dict[int, tuple[str, bool]]:
    """tokenizer_config.json's added_tokens_decoder: id -> (content, special)."""
    out = {}
    for key, value in (tok_cfg.get("added_tokens_decoder") or {}).items():
        if isinstance(value, dict) and isinstance(value.get("content"), str) and str(key).isdigit():
            out[int(key)] = (value["content"], bool(value.get("special", True)))
    return out


SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class PromptIds:
    """A prompt as ParallelComp needs it: every chunk input is header + context[chunk] + question."""
    header: list[int]  # what the tokenizer adds before any text (a BOS, or nothing), the chat prefix, the instruction
    context: list[int]
    question: list[int]  # the question (with --chat: the rest of the user turn and the assistant header)


class Tokenizer:
    """encode(text) -> ids (no special tokens), decode(ids) -> text, encode_prompt -> PromptIds, plus
    bos_id / stop_ids / vocab_size."""

    def __init__(self, ckpt_dir: str):
        sp_path, hf_path = os.path.join(ckpt_dir, "tokenizer.model"), os.path.join(ckpt_dir, "tokenizer.json")
        tok_cfg = _json(os.path.join(ckpt_dir, "tokenizer_config.json"))
        gen_cfg = _json(os.path.join(ckpt_dir, "generation_config.json"))
        cfg = _json(os.path.join(ckpt_dir, "config.json"))
        self._added: dict[int, tuple[str, bool]] = {}  # SentencePiece folders: ids beyond / besides the model
        self._warned = False
        no_bos = tok_cfg.get("add_bos_token") is False or ("bos_token" in tok_cfg and tok_cfg["bos_token"] is None)
        if os.path.exists(hf_path):
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise CheckpointError("this checkpoint has a tokenizer.json: install the `tokenizers` package "
                                      "(pip install tokenizers)") from None
            try:
                self._hf = HFTokenizer.from_file(hf_path)
            except Exception as e:
                raise CheckpointError(f"{hf_path} cannot be read ({str(e).splitlines()[0]}); re-download it") from None
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            # the tokenizer's own rule: what its post-processor adds in front of a text (possibly nothing;
            # SmolLM2 names bos_token <|im_start|> in tokenizer_config.json, but its tokenizer adds no token)
            with_special = self._hf.encode("a", add_special_tokens=True).ids
            plain = self._hf.encode("a", add_special_tokens=False).ids
            lead = with_special[:len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
            if no_bos:
                lead = []  # transformers rebuilds the post-processor without BOS then
        elif os.path.exists(sp_path):
            import sentencepiece as spm
            self._sp, self._hf = spm.SentencePieceProcessor(), None
            try:
                self._sp.Load(sp_path)
            except (OSError, RuntimeError) as e:
                raise CheckpointError(f"{sp_path} is not a SentencePiece model ({str(e).splitlines()[0]}); "
                                      "re-download it") from None
            self._sp_inner = spm.SentencePieceProcessor()  # the same model without the dummy-prefix "▁"
            self._sp_inner.LoadFromSerializedProto(_without_dummy_prefix(self._sp.serialized_model_proto()))
            self._prepend = tok_cfg.get("add_prefix_space") is not False
            added = _added_tokens(tok_cfg)
            self._added = {i: tc for i, tc in added.items()
                           if i >= self._sp.GetPieceSize() or self._sp.IdToPiece(i) != tc[0]}
            self.vocab_size = max([self._sp.GetPieceSize()] + [i + 1 for i in self._added])
            bos_str = _token_str(tok_cfg.get("bos_token"))
            bos = self.token_id(bos_str) if bos_str else None
            if bos is None:
                bos = next(iter(_ids(gen_cfg.get("bos_token_id")) + _ids(cfg.get("bos_token_id"))), None)
            if bos is None and self._sp.bos_id() >= 0 and "bos_token" not in tok_cfg:
                bos = self._sp.bos_id()
            lead = [] if bos is None or no_bos else [bos]  # add_bos_token defaults to true (LlamaTokenizer)
        else:
            raise CheckpointError(f"no tokenizer.model or tokenizer.json in {ckpt_dir}; copy the tokenizer "
                                  "files of this model into the folder")
        self._lead: list[int] = lead  # what tokenizer(text) puts in front of the text's own tokens
        self.chat_template = _chat_template(ckpt_dir, tok_cfg)
        # the named special tokens a chat template sees (transformers' special_tokens_map)
        self._special_map = {name: _token_str(tok_cfg.get(name)) for name in SPECIAL_NAMES
                             if _token_str(tok_cfg.get(name)) is not None}
        if self._sp is not None:  # strings transformers matches as single tokens in text
            names = {s: self.token_id(s) for s in self._special_map.values()}
            self._specials = {s: i for s, i in names.items() if i is not None}
            self._specials.update({c: i for i, (c, _) in added.items()})
            self._special_re = (re.compile("|".join(re.escape(s) for s in sorted(self._specials, key=len,
                                                                                    reverse=True)))
                                if self._specials else None)
        self.bos_id: int | None = lead[0] if lead else None  # the id the tokenizer puts before every text, or None
        self.bos_token = self.id_to_token(self.bos_id) if self.bos_id is not None else None
        stops = _ids(gen_cfg.get("eos_token_id")) + _ids(cfg.get("eos_token_id"))
        eos_str = _token_str(tok_cfg.get("eos_token"))
        if eos_str and self.token_id(eos_str) is not None:
            stops.append(self.token_id(eos_str))
        if not stops and self._sp is not None and self._sp.eos_id() >= 0:
            stops.append(self._sp.eos_id())
        self.stop_ids: list[int] = sorted(set(stops))

    def token_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        for i, (content, _) in self._added.items():
            if content == token:
                return i
        i = self._sp.PieceToId(token)
        return i if self._sp.IdToPiece(i) == token else None

    def id_to_token(self, i: int) -> str:
        if self._hf is not None:
            return self._hf.id_to_token(i)
        return self._added[i][0] if i in self._added else self._sp.IdToPiece(i)

    def encode(self, text: str) -> list[int]:
        """The text's tokens, without the tokens the tokenizer adds in front (for SentencePiece, special-token
        strings in the text stay plain text; encode_prompt matches them as transformers does)."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.EncodeAsIds(text)

    def _undecodable(self, ids: list[int]) -> None:
        if not self._warned:
            self._warned = True
            print(f"warning: the tokenizer cannot decode token ids {sorted(set(ids))[:8]} (vocabulary size "
                  f"{self.vocab_size}); they are left out of the text", file=sys.stderr)

    def decode(self, ids: list[int]) -> str:
        """The text of ids, special tokens left out. An id the tokenizer does not know (a model vocabulary
        larger than the tokenizer's) is left out too, with one warning per tokenizer."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            self._undecodable(bad)
            ids = [i for i in ids if 0 <= i < self.vocab_size]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        out, run = [], []
        for i in ids + [None]:
            if i is not None and i not in self._added and i < self._sp.GetPieceSize():
                run.append(i)
                continue
            if run:
                text = self._sp.DecodeIds(run)
                if out and self._sp.IdToPiece(run[0]).startswith("\u2581"):
                    text = " " + text  # SentencePiece drops a leading "▁" as the dummy prefix: only at the start
                out.append(text)
                run = []
            if i is None:
                break
            if i in self._added:
                content, special = self._added[i]
                if not special:
                    out.append(content)
            else:
                self._undecodable([i])
        return "".join(out)

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """The text of every token id on its own (for finding sentence ends without decoding a prompt twice);
        computed once per tokenizer, since 128K ids take a moment."""
        if self._hf is not None:
            return [self._hf.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]

        def text(i: int) -> str:
            if i in self._added:
                return self._added[i][0]
            if i >= self._sp.GetPieceSize():
                return ""
            if self._sp.IsByte(i):
                return "\n" if self._sp.IdToPiece(i) == "<0x0A>" else ""
            return self._sp.IdToPiece(i).replace("\u2581", " ")
        return [text(i) for i in range(self.vocab_size)]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template rendered as transformers renders it (apply_chat_template(tokenize=False)): a
        sandbox, trim_blocks / lstrip_blocks, jinja2's loop controls, and the same globals and filters
        (raise_exception, strftime_now, tojson, the {% generation %} tag) and named special tokens."""
        if not self.chat_template:
            raise CheckpointError("--chat: this checkpoint has no chat template (chat_template.jinja or "
                                  "tokenizer_config.json); drop --chat")
        try:
            import jinja2
            import jinja2.ext
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise CheckpointError("--chat needs the jinja2 package: pip install jinja2") from None

        def raise_exception(message):
            raise CheckpointError(f"--chat: the chat template refused the prompt: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)  # jinja2's own tojson escapes HTML characters

        class Generation(jinja2.ext.Extension):  # {% generation %}...{% endgeneration %}: renders its body
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        # the template is text from the checkpoint folder: a sandbox, as in transformers, so it cannot run code
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **self._special_map)
        except TemplateError as e:
            raise CheckpointError(f"--chat: the checkpoint's chat template failed ({e}); drop --chat") from None

    def chat_parts(self, question: str, instruction: str = "") -> tuple[str, str]:
        """The chat template rendered for one user message (the instruction, the context, a blank line, the
        question) and split around the context: (text before the context, text after it, ending with the
        assistant header). The text is the whole rendered template, a BOS it prints included (transformers then
        adds no other)."""
        mark = "\x00CONTEXT\x00"
        text = self.render_chat([{"role": "user", "content": instruction + mark + "\n\n" + question}])
        if text.count(mark) != 1:
            raise CheckpointError("--chat: the checkpoint's chat template drops or repeats the user's message; "
                                  "drop --chat")
        prefix, _, rest = text.partition(mark)
        return prefix, rest

    def _spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The text encoded as transformers' tokenizer(text, add_special_tokens=False) encodes it, and the
        characters [start, end) of the text each token stands for (empty for a token with no characters of
        its own)."""
        if self._hf is not None:
            enc = self._hf.encode(text, add_special_tokens=False)
            return list(enc.ids), [tuple(o) for o in enc.offsets]
        # transformers rebuilds tokenizer.model as a `tokenizers` pipeline: special-token strings are single
        # tokens, and the dummy-prefix "▁" goes before the text's first character only when it is not a space
        # (Metaspace, prepend_scheme "first"), never after a special token
        ids, spans, pos = [], [], 0
        pieces = list(self._special_re.finditer(text)) if self._special_re is not None else []
        for m in pieces + [None]:
            end = m.start() if m is not None else len(text)
            if end > pos:
                seg = text[pos:end]
                sp = self._sp if pos == 0 and self._prepend and not seg.startswith(" ") else self._sp_inner
                starts = [0]
                for ch in seg:
                    starts.append(starts[-1] + len(ch.encode("utf-8")))
                for p in sp.encode(seg, return_type="proto").pieces:
                    ids.append(p.id)
                    b, e = bisect_right(starts, p.begin) - 1, bisect_left(starts, p.end)
                    spans.append((pos + b, pos + max(b, e)))
            if m is not None:
                ids.append(self._specials[m.group()])
                spans.append(m.span())
                pos = m.end()
        return ids, spans

    def encode_prompt(self, context: str, question: str, chat: bool = False, instruction: str = "") -> PromptIds:
        """The ids of header, context and question (see PromptIds). The text is instruction + context + question
        (the instruction, e.g. a task's preamble, is in the header: every chunk input repeats it).

        The whole prompt is encoded once, as the model's own tokenizer encodes it: without --chat
        tokenizer(context + question), i.e. what the tokenizer adds in front (a BOS, or nothing) and the tokens
        of the text; with --chat the rendered chat template (its own BOS text, if it prints one) encoded with
        add_special_tokens=False, as apply_chat_template(tokenize=True) does. The ids are then split where the
        context's characters begin and end. The rule at the joins: every token that holds a character of the
        context is a context token (SentencePiece's "▁The" after "[INST] ", Llama 3's ".\n\n" at the end of
        the context); the header is the tokens before the first of them, the question the tokens after the
        last; a token with no characters of its own (SentencePiece's lone dummy-prefix "▁", the first bytes of a
        byte-fallback character) goes with the token after it. So header + context +
        question is exactly the tokenizer's encoding of the whole text, with no token added or re-encoded."""
        if chat:
            prefix, rest = self.chat_parts(question, instruction)
            lead = []
        else:
            prefix, rest, lead = instruction, question, self._lead
        text = prefix + context + rest
        cs, ce = len(prefix), len(prefix) + len(context)
        ids, spans = self._spans(text)
        in_context, after = [None] * len(ids), None
        for k in range(len(ids) - 1, -1, -1):  # a token with no characters goes with the token after it
            b, e = spans[k]
            after = in_context[k] = (b < ce and e > cs) if e > b else after
        before = False
        for k in range(len(ids)):  # ... or, at the very end, with the one before it
            before = in_context[k] = before if in_context[k] is None else in_context[k]
        if any(in_context):
            first = in_context.index(True)
            last = len(in_context) - in_context[::-1].index(True)
        else:  # no context text: the header is what lies before where the context would be
            first = last = next((k for k, (b, e) in enumerate(spans) if e > b and b >= cs), len(ids))
        return PromptIds(lead + ids[:first], ids[first:last], ids[last:])


def load_tokenizer(ckpt_dir: str) -> Tokenizer:
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint folder {ckpt_dir!r} does not exist or is not a folder")
    return Tokenizer(ckpt_dir)
