"""Tokenizers for checkpoint folders: SentencePiece `tokenizer.model` (Llama 2, Mistral) or a Hugging Face
`tokenizer.json` (Llama 3/3.1, Qwen2) through the optional `tokenizers` package, behind one interface.

BOS, EOS and every stop token come from the folder's tokenizer_config.json, generation_config.json and
config.json, never from hard-coded ids. `encode` never adds special tokens: callers place BOS themselves.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

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


@dataclass
class PromptIds:
    """A prompt as ParallelComp needs it: every chunk input is header + context[chunk] + question."""
    header: list[int]  # what the tokenizer adds before any text (a BOS, or nothing), then the chat prefix
    context: list[int]
    question: list[int]  # the question (with --chat: the rest of the user turn and the assistant header)


class Tokenizer:
    """encode(text) -> ids (no special tokens), decode(ids) -> text, plus bos_id / stop_ids / vocab_size."""

    def __init__(self, ckpt_dir: str):
        sp_path, hf_path = os.path.join(ckpt_dir, "tokenizer.model"), os.path.join(ckpt_dir, "tokenizer.json")
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
        elif os.path.exists(sp_path):
            import sentencepiece as spm
            self._sp, self._hf = spm.SentencePieceProcessor(), None
            try:
                self._sp.Load(sp_path)
            except (OSError, RuntimeError) as e:
                raise CheckpointError(f"{sp_path} is not a SentencePiece model ({str(e).splitlines()[0]}); "
                                      "re-download it") from None
            self.vocab_size = self._sp.GetPieceSize()
        else:
            raise CheckpointError(f"no tokenizer.model or tokenizer.json in {ckpt_dir}; copy the tokenizer "
                                  "files of this model into the folder")
        tok_cfg = _json(os.path.join(ckpt_dir, "tokenizer_config.json"))
        gen_cfg = _json(os.path.join(ckpt_dir, "generation_config.json"))
        cfg = _json(os.path.join(ckpt_dir, "config.json"))
        self.chat_template = _chat_template(ckpt_dir, tok_cfg)
        bos_str = _token_str(tok_cfg.get("bos_token"))
        if self._hf is not None:
            # the tokenizer's own rule: what its post-processor adds in front of the text (possibly nothing;
            # SmolLM2 names bos_token <|im_start|> in tokenizer_config.json, but its tokenizer adds no token)
            with_special = self._hf.encode("a", add_special_tokens=True).ids
            plain = self._hf.encode("a", add_special_tokens=False).ids
            n = len(with_special) - len(plain) if with_special[-len(plain):] == plain else 0
            bos = with_special[0] if n > 0 else None
            if tok_cfg.get("add_bos_token") is False or ("bos_token" in tok_cfg and tok_cfg["bos_token"] is None):
                bos = None  # transformers rebuilds the post-processor without BOS then
        else:
            bos = self.token_id(bos_str) if bos_str else None
            if bos is None:
                bos = next(iter(_ids(gen_cfg.get("bos_token_id")) + _ids(cfg.get("bos_token_id"))), None)
            if bos is None and self._sp.bos_id() >= 0 and "bos_token" not in tok_cfg:
                bos = self._sp.bos_id()
            # Qwen2 says "no BOS at all" with add_bos_token: false and/or bos_token: null
            if tok_cfg.get("add_bos_token") is False or ("bos_token" in tok_cfg and tok_cfg["bos_token"] is None):
                bos = None
        self.bos_id: int | None = bos  # the id the tokenizer puts before every text, or None
        self.bos_token = self.id_to_token(bos) if bos is not None else None
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
        i = self._sp.PieceToId(token)
        return i if self._sp.IdToPiece(i) == token else None

    def id_to_token(self, i: int) -> str:
        return self._hf.id_to_token(i) if self._hf is not None else self._sp.IdToPiece(i)

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(list(ids), skip_special_tokens=True)
        return self._sp.DecodeIds(list(ids))

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """The text of every token id on its own (for finding sentence ends without decoding a prompt twice);
        computed once per tokenizer, since 128K ids take a moment."""
        if self._hf is not None:
            return [self._hf.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]
        return [self._sp.IdToPiece(i).replace("\u2581", " ") if not self._sp.IsByte(i) else
                ("\n" if self._sp.IdToPiece(i) == "<0x0A>" else "") for i in range(self.vocab_size)]

    def chat_parts(self, question: str) -> tuple[str, str]:
        """The chat template rendered for one user message (the context, a blank line, the question) and split
        around the context: (text before the context, text after it, ending with the assistant header)."""
        if not self.chat_template:
            raise CheckpointError("--chat: this checkpoint has no chat template (chat_template.jinja or "
                                  "tokenizer_config.json); drop --chat")
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise CheckpointError("--chat needs the jinja2 package: pip install jinja2") from None

        def raise_exception(message):
            raise CheckpointError(f"--chat: the chat template refused the prompt: {message}")

        mark = "\x00CONTEXT\x00"
        # the template is text from the checkpoint folder: a sandbox, as in transformers, so it cannot run code
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            text = env.from_string(self.chat_template).render(
                messages=[{"role": "user", "content": mark + "\n\n" + question}], add_generation_prompt=True,
                bos_token=self.bos_token or "", eos_token="")
        except TemplateError as e:
            raise CheckpointError(f"--chat: the checkpoint's chat template failed ({e}); drop --chat") from None
        if mark not in text:
            raise CheckpointError("--chat: the checkpoint's chat template drops the user's message; drop --chat")
        if self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]  # the BOS the tokenizer adds is placed as an id, never as text
        prefix, _, rest = text.partition(mark)
        return prefix, rest

    def encode_prompt(self, context: str, question: str, chat: bool = False) -> PromptIds:
        """The ids of header, context and question (see PromptIds)."""
        prefix = ""
        if chat:
            prefix, question = self.chat_parts(question)
        bos = [self.bos_id] if self.bos_id is not None else []
        return PromptIds(bos + self.encode(prefix), self.encode(context), self.encode(question))


def load_tokenizer(ckpt_dir: str) -> Tokenizer:
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint folder {ckpt_dir!r} does not exist or is not a folder")
    return Tokenizer(ckpt_dir)
