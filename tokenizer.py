"""Tokenizers for checkpoint folders: SentencePiece `tokenizer.model` (Llama 2, Mistral) or a Hugging Face
`tokenizer.json` (Llama 3/3.1, Qwen2) through the optional `tokenizers` package, behind one interface.

BOS, EOS and every stop token come from the folder's tokenizer_config.json, generation_config.json and
config.json, never from hard-coded ids. `encode` never adds special tokens: callers place BOS themselves.
"""
from __future__ import annotations

import json
import os

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
        self.chat_template = tok_cfg.get("chat_template")
        bos_str = _token_str(tok_cfg.get("bos_token"))
        bos = self.token_id(bos_str) if bos_str else None
        if bos is None:
            bos = next(iter(_ids(gen_cfg.get("bos_token_id")) + _ids(cfg.get("bos_token_id"))), None)
        if bos is None and self._sp is not None and self._sp.bos_id() >= 0 and "bos_token" not in tok_cfg:
            bos = self._sp.bos_id()
        # Qwen2 says "no BOS at all" with add_bos_token: false and/or bos_token: null, while its config.json
        # still names a bos_token_id (<|endoftext|>) that the model never sees at the start
        if tok_cfg.get("add_bos_token") is False or ("bos_token" in tok_cfg and tok_cfg["bos_token"] is None):
            bos = None
        self.bos_id: int | None = bos
        self.bos_token = bos_str
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

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(list(ids), skip_special_tokens=True)
        return self._sp.DecodeIds(list(ids))

    def token_texts(self) -> list[str]:
        """The text of every token id on its own (for finding sentence ends without decoding a prompt twice)."""
        if self._hf is not None:
            return [self._hf.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]
        return [self._sp.IdToPiece(i).replace("\u2581", " ") if not self._sp.IsByte(i) else
                ("\n" if self._sp.IdToPiece(i) == "<0x0A>" else "") for i in range(self.vocab_size)]


def load_tokenizer(ckpt_dir: str) -> Tokenizer:
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint folder {ckpt_dir!r} does not exist or is not a folder")
    return Tokenizer(ckpt_dir)
