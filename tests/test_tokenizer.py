"""tokenizer.py against the reference libraries and `transformers`, on tokenizers built in the test session:
a Llama-style SentencePiece `tokenizer.model` (conftest.train_sentencepiece) and a Llama 3-style byte-level
BPE `tokenizer.json` (conftest.train_byte_bpe). BOS / EOS / stop ids must come from the folder's files."""
import os
import random
import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm
import tokenizers
import transformers

import model as M
import tokenizer as T
from conftest import read_json, sample_text, write_json

HANDPICKED = [
    "hello world",
    "The sky is blue. The grass is green!\nA new line.\n\nA new paragraph.",
    "digits 0 7 42 31415926535 and 1,000.50",
    "internal   spaces  and trailing spaces  ",
    "tabs\tand\r\nwindows line ends\r\n",
    "café naïve jalapeño über straße Ünïcödé",
    "東京 数字 日本語のテキスト، مرحبا بالعالم",
    "emoji 😀👍🏽 and unseen letters Ωλ ℕ ∑ (byte fallback)",
    "quotes: it's, don't, \"double\", 'single'",
    "\nstarts with a newline",
]
LEADING_SPACE = [" hello", "  two spaces first", " ", "   "]


def varied_texts(n: int = 25, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return HANDPICKED + [sample_text(rng, rng.randint(1, 8)) for _ in range(n)]


def copy_folder(src, dst, **json_files):
    """A copy of a tokenizer folder with some JSON files replaced (name without .json -> content)."""
    shutil.copytree(src, dst)
    for name, data in json_files.items():
        write_json(dst, name + ".json", data)
    return str(dst)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, sp_model):
    """A Llama 2-style tokenizer folder: tokenizer.model + tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("sp_tok")
    shutil.copy(sp_model, folder / "tokenizer.model")
    write_json(folder, "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                                                 "tokenizer_class": "LlamaTokenizer"})
    return str(folder)


# ----------------------------------------------------------------------------------------------------
# SentencePiece (Llama 2, Mistral)

def test_sentencepiece_ids_equal_sentencepiece_and_transformers(sp_dir):
    ours = T.load_tokenizer(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "tokenizer.model"))
    hf = transformers.AutoTokenizer.from_pretrained(sp_dir)
    for text in varied_texts():
        ids = ours.encode(text)
        assert ids == sp.encode(text), text
        assert ids == hf.encode(text, add_special_tokens=False), text
    assert any(sp.IsByte(i) for i in ours.encode(HANDPICKED[7]))  # the byte-fallback path was exercised


def test_sentencepiece_leading_spaces_follow_sentencepiece(sp_dir):
    """Where transformers and raw SentencePiece disagree, we follow SentencePiece, and this is why.

    SentencePiece always prepends its dummy-prefix "▁" (add_dummy_prefix), so " hello" is "▁▁hello": the
    text's own space survives. That is how Llama 2 / Mistral were trained and how Meta's reference tokenizer
    encodes (sp.encode). transformers 5 rebuilds tokenizer.model as a `tokenizers` Metaspace pre-tokenizer
    (prepend_scheme "first"), which skips the prefix when the text already starts with "▁" after spaces are
    replaced: " hello" and "hello" both become "▁hello", and its decoder then strips one leading space, so
    " hello" does not even round-trip there. `encode` is plain SentencePiece, so a leading space never vanishes;
    encode_prompt encodes the prompt's parts as transformers does (tests/test_prompt_ids.py).
    """
    ours = T.load_tokenizer(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "tokenizer.model"))
    for text in LEADING_SPACE:
        assert ours.encode(text) == sp.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode(" hello") != ours.encode("hello")


def test_sentencepiece_special_token_strings_are_plain_text(sp_dir):
    """`encode` is for text: "<s>" written in a document is the characters <, s, > (as sp.encode and Meta's
    reference see it; transformers would turn it into BOS). Callers place BOS by id."""
    ours = T.load_tokenizer(sp_dir)
    text = "a <s> b </s> c"
    assert ours.bos_id not in ours.encode(text) and not set(ours.stop_ids) & set(ours.encode(text))
    assert ours.decode(ours.encode(text)) == text


def test_sentencepiece_decode_round_trips(sp_dir):
    ours = T.load_tokenizer(sp_dir)
    for text in varied_texts(seed=1):
        assert ours.decode(ours.encode(text)) == text, text


def test_sentencepiece_special_ids_and_vocab(sp_dir):
    ours = T.load_tokenizer(sp_dir)
    assert ours.vocab_size == 512
    assert ours.bos_id == 1 and ours.bos_token == "<s>"
    assert ours.stop_ids == [2]
    assert ours.token_id("<s>") == 1 and ours.token_id("</s>") == 2 and ours.token_id("no such piece") is None
    assert ours.decode([ours.bos_id] + ours.encode("hello") + ours.stop_ids) == "hello"


def test_sentencepiece_token_texts(sp_dir):
    ours = T.load_tokenizer(sp_dir)
    texts = ours.token_texts
    assert len(texts) == ours.vocab_size
    ids = ours.encode("the sky is blue.\nthe grass")
    assert "".join(texts[i] for i in ids) == " the sky is blue.\nthe grass"  # with the dummy-prefix space
    assert texts[ours.token_id("<0x0A>")] == "\n"


# ----------------------------------------------------------------------------------------------------
# tokenizer.json (Llama 3, Qwen2): byte-level BPE through `tokenizers`

def test_tokenizer_json_ids_equal_tokenizers_and_transformers(bpe_tokenizer_dir):
    ours = T.load_tokenizer(bpe_tokenizer_dir)
    ref = tokenizers.Tokenizer.from_file(os.path.join(bpe_tokenizer_dir, "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    # special-token strings are matched in text here, as by `tokenizers` and transformers (Llama 3 chat prompts
    # are rendered as text with them)
    specials = ["<|begin_of_text|>Hello<|eot_id|>", "a <|start_header_id|>user<|end_header_id|>\n\nhi"]
    for text in varied_texts(seed=2) + LEADING_SPACE + specials:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert ids == hf.encode(text, add_special_tokens=False), text
    assert ours.encode(specials[0])[0] == ours.bos_id  # and they were matched as special tokens
    assert ref.encode("hi").ids[0] == ours.bos_id  # the file's own post-processor adds BOS; encode() does not


def test_tokenizer_json_decode_round_trips(bpe_tokenizer_dir):
    ours = T.load_tokenizer(bpe_tokenizer_dir)
    for text in varied_texts(seed=3) + LEADING_SPACE:
        assert ours.decode(ours.encode(text)) == text, text
    eot = ours.token_id("<|eot_id|>")
    assert ours.decode([ours.bos_id] + ours.encode("hi there") + [eot]) == "hi there"  # specials skipped


def test_tokenizer_json_special_ids_from_files(bpe_tokenizer_dir):
    ours = T.load_tokenizer(bpe_tokenizer_dir)
    eos_list = read_json(bpe_tokenizer_dir, "generation_config.json")["eos_token_id"]
    assert len(eos_list) == 2
    assert ours.bos_token == "<|begin_of_text|>" and ours.bos_id == ours.token_id("<|begin_of_text|>")
    assert ours.stop_ids == sorted(eos_list) == sorted([ours.token_id("<|end_of_text|>"),
                                                        ours.token_id("<|eot_id|>")])
    assert ours.vocab_size == 600 + 5
    assert ours.token_id("<|not_a_token|>") is None


def test_tokenizer_json_token_texts(bpe_tokenizer_dir):
    ours = T.load_tokenizer(bpe_tokenizer_dir)
    texts = ours.token_texts
    assert len(texts) == ours.vocab_size
    text = "The sky is blue.\nThe grass is green!"
    assert "".join(texts[i] for i in ours.encode(text)) == text
    assert texts[ours.token_id("<|eot_id|>")] == "<|eot_id|>"


# ----------------------------------------------------------------------------------------------------
# BOS / EOS / stop ids come from the folder's files

def test_every_eos_id_of_generation_config_and_config_is_a_stop_id(sp_dir, tmp_path):
    folder = copy_folder(sp_dir, tmp_path / "t", generation_config={"eos_token_id": [2, 5, 7]},
                         config={"eos_token_id": 9})
    assert T.load_tokenizer(folder).stop_ids == [2, 5, 7, 9]


@pytest.mark.parametrize("tok_cfg", [
    {"bos_token": None, "eos_token": "<|eot_id|>", "add_bos_token": False},  # Qwen2.5
    {"bos_token": None, "eos_token": "<|eot_id|>"},  # bos_token null alone
    {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": False},
], ids=["null_and_false", "null", "add_bos_false"])
def test_qwen_style_folder_has_no_bos(bpe_tokenizer_dir, tmp_path, tok_cfg):
    """Qwen2 folders say "no BOS" in tokenizer_config.json while config.json and generation_config.json still
    carry a bos_token_id (<|endoftext|>, also their EOS): bos_id must be None."""
    end = 601  # <|end_of_text|> in the BPE folder, standing in for Qwen's <|endoftext|>
    folder = copy_folder(bpe_tokenizer_dir, tmp_path / "qwen", tokenizer_config=tok_cfg,
                         config={"model_type": "qwen2", "bos_token_id": end, "eos_token_id": end},
                         generation_config={"bos_token_id": end, "eos_token_id": [end, 604]})
    ours = T.load_tokenizer(folder)
    assert ours.token_id("<|end_of_text|>") == end
    assert ours.bos_id is None
    assert ours.stop_ids == [end, 604]
    if tok_cfg["bos_token"] is None:
        assert transformers.AutoTokenizer.from_pretrained(folder).bos_token_id is None


def test_bos_falls_back_to_config_files_without_tokenizer_config(sp_dir, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(sp_dir, folder)
    os.remove(folder / "tokenizer_config.json")
    assert T.load_tokenizer(str(folder)).bos_id == 1  # SentencePiece's own <s>
    write_json(folder, "config.json", {"bos_token_id": 3, "eos_token_id": [2, 3]})
    tok = T.load_tokenizer(str(folder))
    assert tok.bos_id == 3 and tok.stop_ids == [2, 3]


def test_unreadable_tokenizer_folders_raise_checkpoint_error(sp_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(M.CheckpointError, match="tokenizer.model or tokenizer.json"):
        T.load_tokenizer(str(empty))
    with pytest.raises(M.CheckpointError, match="does not exist"):
        T.load_tokenizer(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    shutil.copytree(sp_dir, broken)
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(M.CheckpointError, match="tokenizer_config.json"):
        T.load_tokenizer(str(broken))
    (broken / "tokenizer_config.json").write_text("{}")
    (broken / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(M.CheckpointError, match="tokenizer.model"):
        T.load_tokenizer(str(broken))


# ----------------------------------------------------------------------------------------------------
# SentencePiece models that normalize, text that is not Unicode, no protobuf

@pytest.fixture(scope="module")
def normalizing_sp_dir(tmp_path_factory):
    """A tokenizer.model trained with NFKC and white-space folding (SentencePiece's defaults), as a Llama-style
    folder: transformers' Llama tokenizer applies neither."""
    folder = tmp_path_factory.mktemp("nfkc_tok")
    rng = random.Random(0)
    with open(folder / "corpus.txt", "w", encoding="utf-8") as f:
        f.writelines(sample_text(rng, 3).replace("\n", " ") + "\n" for _ in range(1500))
    spm.SentencePieceTrainer.Train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="nmt_nfkc",
        remove_extra_whitespaces=True, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    os.remove(folder / "corpus.txt")
    os.remove(folder / "tokenizer.vocab")
    write_json(folder, "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                                                 "tokenizer_class": "LlamaTokenizer", "legacy": False})
    return str(folder)


NORMALIZED_AWAY = ["two  spaces and  more   here", "  leading and trailing  ", "ligature \ufb01ne, full-width \uff21",
                   "composed \u00c5 and decomposed A\u030a", "tabs\tand\nnew lines  \n"]


def test_sentencepiece_model_that_normalizes_encodes_as_transformers(normalizing_sp_dir):
    """SentencePiece itself would fold the spaces and NFKC-map the characters (the old code did, unlike
    transformers); ours encodes as transformers does, prompt and plain text alike."""
    ours, hf = T.load_tokenizer(normalizing_sp_dir), transformers.AutoTokenizer.from_pretrained(normalizing_sp_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(normalizing_sp_dir, "tokenizer.model"))
    for text in NORMALIZED_AWAY:
        assert sp.encode(text) != hf.encode(text, add_special_tokens=False), text  # they do differ
        p = ours.encode_prompt(text, "\nWhy?")
        assert p.header + p.context + p.question == hf(text + "\nWhy?")["input_ids"], text
        if not text.startswith(" "):  # (see test_sentencepiece_leading_spaces_follow_sentencepiece)
            assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_lone_surrogates_are_one_clear_error(kind, sp_dir, bpe_tokenizer_dir):
    """Bytes that are not UTF-8, decoded with errors="surrogateescape", leave lone surrogates, which crashed
    encode_prompt with a UnicodeEncodeError (SentencePiece) or a TypeError (tokenizers)."""
    tok = T.load_tokenizer(sp_dir if kind == "sentencepiece" else bpe_tokenizer_dir)
    bad = b"caf\xe9 au lait".decode("utf-8", errors="surrogateescape")
    for args, what in [((bad, "Why?"), "context"), (("The text.", bad), "question"),
                       (("The text.", "Why?", False, bad), "instruction")]:
        with pytest.raises(T.TextError, match=f"the {what} is not valid Unicode: a lone surrogate U\\+DCE9 at "
                                              "character 3; decode its bytes with errors='replace'"):
            tok.encode_prompt(*args)
    with pytest.raises(T.TextError, match="the text is not valid Unicode"):
        tok.encode(bad)
    assert issubclass(T.TextError, ValueError)


def test_answer_refuses_lone_surrogates_before_any_work():
    import parallelcomp as P
    from model import load_model
    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "model")
    with pytest.raises(T.TextError, match="the context is not valid Unicode"):
        P.answer(load_model(demo), T.load_tokenizer(demo), "The door \udcff number is 3.", "What number?")


def test_sentencepiece_needs_no_protobuf(sp_dir, tmp_path):
    """requirements.txt has no protobuf: loading and encoding a tokenizer.model, plain and --chat, must not need
    it (the old code asked SentencePiece for protobuf results: an ImportError in a venv made from requirements.txt
    alone). .ci/run also runs the CLI in such a venv."""
    folder = copy_folder(sp_dir, tmp_path / "t", tokenizer_config={
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "tokenizer_class": "LlamaTokenizer",
        "chat_template": "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]"})
    code = ("import sys; sys.modules['google'] = sys.modules['google.protobuf'] = None; import tokenizer; "
            "t = tokenizer.load_tokenizer(sys.argv[1]); ps = [t.encode_prompt('The sky. ', 'Who?', c) for c in "
            "(False, True)]; print([t.decode(p.header + p.context + p.question) for p in ps])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, folder], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == str(["The sky. Who?", "[INST] The sky. \n\nWho? [/INST]"]) + "\n"
