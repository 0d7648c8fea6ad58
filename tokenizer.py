"""Tokenizers for checkpoint folders: SentencePiece `tokenizer.model` (Llama 2, Mistral) or a Hugging Face
`tokenizer.json` (Llama 3/3.1, Qwen2, SmolLM2) through the optional `tokenizers` package, behind one interface.

`Tokenizer` holds what the folder's JSON files say: BOS, EOS and every stop token (never hard-coded ids), the
special tokens, the chat template (chat_template.py), and `encode_prompt`, what ParallelComp feeds the model (see
there for the rule at the joins). Its two subclasses hold what differs: reading the file, encoding a text as
transformers does where it stands (at the start or after other text), decoding, lookups.
"""
from __future__ import annotations

import functools
import itertools
import os
import re
import sys
from dataclasses import dataclass

import chat_template
from model import CheckpointError, read_json

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TextError(ValueError):
    """Text that no tokenizer can take; the message says what is wrong and what to do."""


@dataclass
class PromptIds:
    """A prompt as ParallelComp needs it: every chunk input is header + context[chunk] + question."""
    header: list[int]  # what the tokenizer adds before any text (a BOS, or nothing), the chat prefix, the instruction
    context: list[int]
    question: list[int]  # the whole question (with --chat: the rest of the user turn and the assistant header)


def _json(path: str) -> dict:
    return read_json(path, "") if os.path.exists(path) else {}  # a missing file says nothing


def _token_str(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def check_text(text: str, what: str = "text") -> None:
    """Refuse lone surrogates (bytes that are not UTF-8 read with errors="surrogateescape"): no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TextError(f"the {what} is not valid Unicode: a lone surrogate U+{ord(text[e.start]):04X} at character "
                        f"{e.start}; decode its bytes with errors='replace', or fix the text") from None


def _move_spaces(left: str, right: str) -> tuple[str, str]:
    """The spaces that end `left` moved to the start of `right`: SentencePiece and byte-level BPE both start a
    word's token with the space before it ("▁What", "ĠWhat"), so they belong to the text after a join."""
    kept = left.rstrip(" ")
    return kept, left[len(kept):] + right


class Tokenizer:
    """encode(text) -> ids (no special tokens), decode(ids) -> text, encode_prompt -> PromptIds, plus
    bos_id / stop_ids / vocab_size / token_texts and the chat template. Build one with load_tokenizer."""

    vocab_size: int
    fallback_stops: list[int] = []  # stop ids when the JSON files name none

    def __init__(self, ckpt_dir: str):
        tok_cfg, gen_cfg, cfg = (_json(os.path.join(ckpt_dir, name)) for name in
                                 ("tokenizer_config.json", "generation_config.json", "config.json"))
        self._load(ckpt_dir, tok_cfg)
        no_bos = tok_cfg.get("add_bos_token") is False or ("bos_token" in tok_cfg and tok_cfg["bos_token"] is None)
        self._lead: list[int] = [] if no_bos else self._added_in_front(tok_cfg, gen_cfg, cfg)  # before any text
        self.bos_id: int | None = self._lead[0] if self._lead else None
        self.bos_token = self.id_to_token(self.bos_id) if self.bos_id is not None else None
        eos = [self.token_id(s) for s in [_token_str(tok_cfg.get("eos_token"))] if s]
        stops = _ids(gen_cfg.get("eos_token_id")) + _ids(cfg.get("eos_token_id")) + [i for i in eos if i is not None]
        self.stop_ids: list[int] = sorted(set(stops or self.fallback_stops))
        # the named special tokens a chat template sees (transformers' special_tokens_map)
        self.special_tokens = {n: _token_str(tok_cfg.get(n)) for n in SPECIAL_NAMES if _token_str(tok_cfg.get(n))}
        self.chat_template = chat_template.find_template(ckpt_dir, tok_cfg)
        self._warned = False

    def decode(self, ids: list[int]) -> str:
        """The text of ids, special tokens left out. An id the tokenizer does not know (a model vocabulary
        larger than the tokenizer's) is left out too, with one warning per tokenizer."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not self._can_decode(i)]
        if bad and not self._warned:
            self._warned = True
            print(f"warning: the tokenizer cannot decode token ids {sorted(set(bad))[:8]} (vocabulary size "
                  f"{self.vocab_size}); they are left out of the text", file=sys.stderr)
        return self._decode([i for i in ids if self._can_decode(i)])

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """The text of every token id on its own (for finding sentence ends); computed once, 128K ids take a moment."""
        return [self._token_text(i) for i in range(self.vocab_size)]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template rendered as apply_chat_template(tokenize=False) renders it (chat_template.render)."""
        return chat_template.render(self.chat_template, messages, self.special_tokens, add_generation_prompt)

    def chat_parts(self, question: str, instruction: str = "") -> tuple[str, str]:
        """(text before the context, after it) of the user turn (chat_template.chat_parts); CheckpointError if broken."""
        return chat_template.chat_parts(self.chat_template, self.special_tokens, question, instruction)

    def encode_prompt(self, context: str, question: str, chat: bool = False, instruction: str = "") -> PromptIds:
        """Header, context and question ids of instruction + context + question, or with --chat of the template
        rendered for the user message instruction + context + "\\n\\n" + question (split by chat_parts).
        The three texts are encoded apart, each as transformers encodes it where it stands (the header at the
        start, the others after other text), spaces that end a text moved to the next: every chunk input reads
        header + chunk + the whole question. A token across a join (Llama 3's ".\\n\\n") is split into the two
        sides' tokens, as every other chunk input must be (README: the header and the joins)."""
        for text, what in ((context, "context"), (question, "question"), (instruction, "instruction")):
            check_text(text, what)
        if chat:
            (prefix, rest), lead = self.chat_parts(question, instruction), []
        else:
            prefix, rest, lead = instruction, question, self._lead
        prefix, context = _move_spaces(prefix, context)
        context, rest = _move_spaces(context, rest)
        return PromptIds(lead + self._encode_text(prefix, first=True), self._encode_text(context, first=not prefix),
                         self._encode_text(rest, first=not (prefix or context)))

    # each file format implements _load, token_id, id_to_token, encode, _encode_text (a text as transformers
    # encodes it at the start of the input or after other text), _can_decode, _decode, _token_text, _added_in_front


# ----------------------------------------------------------------------------------------------------
# tokenizer.model

def _without_normalizer(sp, dummy_prefix: bool):
    """sp's model with the identity normalizer (no NFKC, no white-space folding) and the dummy prefix on or off.
    A serialized message appended to another is merged into it field by field (protobuf's rule), so the
    NormalizerSpec that SentencePieceNormalizer writes replaces the model's own: no protobuf package needed."""
    import sentencepiece as spm
    spec = spm.SentencePieceNormalizer(rule_name="identity", add_dummy_prefix=dummy_prefix,
                                       remove_extra_whitespaces=False)
    return spm.SentencePieceProcessor(model_proto=sp.serialized_model_proto() + spec.serialized_model_proto())


class SentencePieceTokenizer(Tokenizer):
    """tokenizer.model, encoded as transformers' Llama tokenizer encodes it: special-token strings are single
    tokens, the dummy-prefix "▁" goes before the input's first character only when that is not a space (never
    after a special token), and the text is not normalized (that tokenizer ignores a model's NFKC and white-space
    folding, so we turn them off)."""

    def _load(self, ckpt_dir: str, tok_cfg: dict) -> None:
        import sentencepiece as spm
        path, sp = os.path.join(ckpt_dir, "tokenizer.model"), spm.SentencePieceProcessor()
        try:
            sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a SentencePiece model ({str(e).splitlines()[0]}); "
                                  "re-download it") from None
        self.sp, self.inner = _without_normalizer(sp, dummy_prefix=True), _without_normalizer(sp, dummy_prefix=False)
        self.prepend = tok_cfg.get("add_prefix_space") is not False
        self.size, self.model_bos = sp.GetPieceSize(), sp.bos_id()
        self.fallback_stops = [sp.eos_id()] if sp.eos_id() >= 0 else []
        added = {int(k): v for k, v in (tok_cfg.get("added_tokens_decoder") or {}).items()
                 if isinstance(v, dict) and isinstance(v.get("content"), str) and str(k).isdigit()}
        # id -> (content, special) of the tokens beyond or besides the model
        self.added = {i: (v["content"], bool(v.get("special", True))) for i, v in added.items()
                      if i >= self.size or sp.IdToPiece(i) != v["content"]}
        self.vocab_size = max([self.size] + [i + 1 for i in self.added])
        # strings transformers matches in text as single tokens: the named special tokens and the added tokens
        names = [_token_str(tok_cfg.get(n)) for n in SPECIAL_NAMES] + [v["content"] for v in added.values()]
        self.specials = {s: self.token_id(s) for s in names if s and self.token_id(s) is not None}
        pattern = "|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True))
        self.special_re = re.compile(f"({pattern})") if self.specials else None

    def token_id(self, token: str) -> int | None:
        added = [i for i, (content, _) in self.added.items() if content == token]
        i = added[0] if added else self.sp.PieceToId(token)
        return i if added or self.sp.IdToPiece(i) == token else None

    def id_to_token(self, i: int) -> str:
        return self.added[i][0] if i in self.added else self.sp.IdToPiece(i)

    def encode(self, text: str) -> list[int]:
        """Plain SentencePiece, as Meta's reference encodes: special-token strings stay text, the dummy prefix
        always (encode_prompt encodes as transformers does)."""
        check_text(text)
        return self.sp.EncodeAsIds(text)

    def _encode_text(self, text: str, first: bool) -> list[int]:
        ids = []
        parts = self.special_re.split(text) if self.special_re else [text]  # text, special, text, ...
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.specials[part])
            elif part:
                start = first and k == 0 and self.prepend and not part.startswith(" ")
                ids += (self.sp if start else self.inner).EncodeAsIds(part)
        return ids

    def _can_decode(self, i: int) -> bool:
        return 0 <= i < self.size or i in self.added

    def _decode(self, ids: list[int]) -> str:
        out = []
        for added, run in itertools.groupby(ids, key=self.added.__contains__):
            run = list(run)
            if added:  # an added token that is not special is text
                out += [self.added[i][0] for i in run if not self.added[i][1]]
            else:  # SentencePiece drops a leading "▁" as the dummy prefix: right only at the start
                space = " " if out and self.sp.IdToPiece(run[0]).startswith("\u2581") else ""
                out.append(space + self.sp.DecodeIds(run))
        return "".join(out)

    def _token_text(self, i: int) -> str:
        if i in self.added:
            return self.added[i][0]
        if i >= self.size:
            return ""
        if self.sp.IsByte(i):
            return "\n" if self.sp.IdToPiece(i) == "<0x0A>" else ""
        return self.sp.IdToPiece(i).replace("\u2581", " ")

    def _added_in_front(self, tok_cfg: dict, *configs: dict) -> list[int]:
        """The BOS that LlamaTokenizer adds (add_bos_token defaults to true): bos_token, else a bos_token_id of
        generation_config.json / config.json, else the model's own when tokenizer_config.json names none."""
        bos_str = _token_str(tok_cfg.get("bos_token"))
        bos = self.token_id(bos_str) if bos_str else None
        if bos is None:
            bos = next(iter(i for c in configs for i in _ids(c.get("bos_token_id"))), None)
        if bos is None and self.model_bos >= 0 and "bos_token" not in tok_cfg:
            bos = self.model_bos
        return [] if bos is None else [bos]


# ----------------------------------------------------------------------------------------------------
# tokenizer.json

class TokenizersTokenizer(Tokenizer):
    """tokenizer.json through the `tokenizers` package, which runs the file's own pipeline."""

    def _load(self, ckpt_dir: str, tok_cfg: dict) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise CheckpointError("this checkpoint has a tokenizer.json: install the `tokenizers` package "
                                  "(pip install tokenizers)") from None
        path = os.path.join(ckpt_dir, "tokenizer.json")
        try:
            self.hf = HFTokenizer.from_file(path)
        except Exception as e:
            raise CheckpointError(f"{path} cannot be read ({str(e).splitlines()[0]}); re-download it") from None
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        # text after a special token is text that does not start the input (Metaspace adds no "▁" there)
        self.anchor = next((t.content for t in self.hf.get_added_tokens_decoder().values()
                            if t.special and not t.rstrip), None)

    def token_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self.hf.id_to_token(i)

    def encode(self, text: str) -> list[int]:
        """The file's pipeline without the tokens its post-processor adds in front (special-token strings are
        special tokens, as transformers reads them)."""
        check_text(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def _encode_text(self, text: str, first: bool) -> list[int]:
        return self.encode(text) if first or self.anchor is None else self.encode(self.anchor + text)[1:]

    def _can_decode(self, i: int) -> bool:
        return 0 <= i < self.vocab_size

    def _decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def _token_text(self, i: int) -> str:
        return self.hf.decode([i], skip_special_tokens=False)

    def _added_in_front(self, *configs: dict) -> list[int]:
        """What the file's post-processor puts in front of a text (possibly nothing: SmolLM2 names bos_token
        <|im_start|> in tokenizer_config.json, but its tokenizer adds no token)."""
        with_special, plain = self.hf.encode("a").ids, self.encode("a")
        return with_special[:len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []


def load_tokenizer(ckpt_dir: str) -> Tokenizer:
    """The folder's tokenizer: tokenizer.json if it has one (transformers reads it first), else tokenizer.model."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint folder {ckpt_dir!r} does not exist or is not a folder")
    for name, cls in (("tokenizer.json", TokenizersTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
        if os.path.exists(os.path.join(ckpt_dir, name)):
            return cls(ckpt_dir)
    raise CheckpointError(f"no tokenizer.model or tokenizer.json in {ckpt_dir}; copy the tokenizer "
                          "files of this model into the folder")
