"""encode_prompt against transformers, on real and synthetic checkpoint folders: header, context and question
are the model's own tokenizer's encodings of their texts, each where it stands in the input; every chunk input
reads header + chunk text + the whole question; a one-chunk input is exactly `tokenizer(text)` (with --chat
`apply_chat_template(..., tokenize=True)`) wherever no token of that encoding crosses a join (README, "The
header and the joins").

Synthetic folders reproduce the tokenizer files and chat templates of Llama-2-chat (its tokenizer.model, and the
tokenizer.json transformers writes from it), Mistral-Instruct (tokenizer.model), Llama-3-Instruct (tokenizer.json
whose post-processor adds a BOS, a template that prints it) and Qwen2.5-Instruct (tokenizer.json without BOS,
ChatML); the real one is SmolLM2-135M-Instruct when `make model` has fetched it."""
import functools
import os
import shutil

import pytest
import transformers

import parallelcomp as P
import tokenizer as T
from conftest import edit_json, read_json, write_json

# the chat templates as their hub repositories ship them (Qwen's without its tool-calling branch)
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
MISTRAL_INSTRUCT = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
QWEN25_INSTRUCT = (
    "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SP_SPECIALS = {"0": "<unk>", "1": "<s>", "2": "</s>"}


def added_tokens_decoder(tokens: dict) -> dict:
    return {i: {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True} for i, c in tokens.items()}


def sp_folder(path, sp_model, template, in_jinja_file=False):
    """A Llama-2-chat / Mistral-Instruct tokenizer folder: tokenizer.model + tokenizer_config.json as those
    repositories write it (the chat template in it, or in chat_template.jinja as transformers 5 saves it)."""
    os.makedirs(path)
    shutil.copy(sp_model, os.path.join(path, "tokenizer.model"))
    cfg = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added_tokens_decoder(SP_SPECIALS),
           "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": False,
           "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer"}
    if in_jinja_file:
        write_json(path, "chat_template.jinja", template)
    else:
        cfg["chat_template"] = template
    write_json(path, "tokenizer_config.json", cfg)
    return str(path)


def llama3_folder(path, bpe_dir):
    """Llama-3-Instruct: tokenizer.json whose post-processor prepends <|begin_of_text|>; the template prints
    bos_token itself."""
    shutil.copytree(bpe_dir, path)
    edit_json(path, "tokenizer_config.json", chat_template=LLAMA3_INSTRUCT)
    return str(path)


def qwen_folder(path, bpe_dir, **tok_cfg):
    """Qwen2.5-Instruct: tokenizer.json with a ByteLevel post-processor only (no BOS), <|im_start|> and
    <|im_end|> added, bos_token null, ChatML template with a default system turn; Qwen's NFC normalizer and
    regex split (digits one by one), which transformers' Qwen2Tokenizer rebuilds whatever the file says."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    os.makedirs(path)
    tok = Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(os.path.join(path, "tokenizer.json"))
    write_json(path, "tokenizer_config.json", dict({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN25_INSTRUCT,
        "clean_up_tokenization_spaces": False, "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072},
        **tok_cfg))
    return str(path)


def smollm2_folder():
    try:
        from eval.get_model import DEFAULT_OUT
    except Exception:  # noqa: BLE001 -- eval/ not importable: no real folder either
        return None
    return DEFAULT_OUT if os.path.exists(os.path.join(DEFAULT_OUT, "tokenizer.json")) else None


def json_folder(path, sp_dir):
    """Llama-2-chat as its hub repository also ships it: a tokenizer.json (the Metaspace pipeline transformers
    writes from tokenizer.model), which is read before tokenizer.model."""
    transformers.AutoTokenizer.from_pretrained(sp_dir).save_pretrained(path)
    return str(path)


# SmolLM2's template: ChatML with a default system turn, no bos_token in it
SMOLLM2_INSTRUCT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
FOLDERS = ["llama2_chat", "llama2_json", "mistral_instruct", "llama3_instruct", "qwen25_instruct", "smollm2_like",
           "smollm2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sp_model, bpe_tokenizer_dir):
    root = tmp_path_factory.mktemp("folders")
    llama2 = sp_folder(root / "llama2", sp_model, LLAMA2_CHAT)
    return {"llama2_chat": llama2,
            "llama2_json": json_folder(root / "llama2_json", llama2),
            "mistral_instruct": sp_folder(root / "mistral", sp_model, MISTRAL_INSTRUCT, in_jinja_file=True),
            "llama3_instruct": llama3_folder(root / "llama3", bpe_tokenizer_dir),
            "qwen25_instruct": qwen_folder(root / "qwen", bpe_tokenizer_dir),
            # SmolLM2's files on the small tokenizer: bos_token names <|im_start|>, the tokenizer adds nothing
            "smollm2_like": qwen_folder(root / "smol", bpe_tokenizer_dir, bos_token="<|im_start|>",
                                        chat_template=SMOLLM2_INSTRUCT,
                                        tokenizer_class="PreTrainedTokenizerFast"),
            "smollm2": smollm2_folder()}


@functools.cache
def load(path):
    """(ours, transformers' AutoTokenizer) for a folder."""
    return T.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


def tokenizers_of(folders, name, chat=False):
    if folders[name] is None:
        pytest.skip("SmolLM2 not fetched (make model)")
    ours, hf = load(folders[name])
    if chat and not ours.chat_template:
        pytest.skip("no chat template")
    return ours, hf


@pytest.fixture(params=FOLDERS)
def pair(request, folders):
    return tokenizers_of(folders, request.param)


# ----------------------------------------------------------------------------------------------------
# The rule, spelled out with transformers

MARK = "\x00CONTEXT\x00"


def ids_of(x):
    return x["input_ids"] if not isinstance(x, list) else x


def hf_encode(hf, text, first=True):
    """transformers' ids of `text` where it stands in the input: at the start, or after other text (here after a
    special token, where a SentencePiece tokenizer adds no dummy prefix), and the characters [start, end) of
    `text` each id covers."""
    anchor = "" if first else hf.eos_token
    enc = hf(anchor + text, add_special_tokens=False, return_offsets_mapping=True)
    skip = 0 if first else 1
    return enc["input_ids"][skip:], [(b - len(anchor), e - len(anchor)) for b, e in enc["offset_mapping"][skip:]]


def reference(hf, context, question, chat=False, instruction=""):
    """encode_prompt's rule with transformers' encodings: the texts of header, context and question (spaces that
    end one moved to the next) and the ids of each, encoded apart where it stands. Also the ids transformers puts
    in front of any text (none with --chat)."""
    if chat:
        prefix, rest = hf.apply_chat_template([{"role": "user", "content": instruction + MARK + "\n\n" + question}],
                                              tokenize=False, add_generation_prompt=True).split(MARK)
        lead = []
    else:
        prefix, rest = instruction, question
        lead = hf("x")["input_ids"][:-len(hf("x", add_special_tokens=False)["input_ids"])]
    texts = [prefix.rstrip(" "), prefix[len(prefix.rstrip(" ")):] + context, rest]
    texts[1:] = [texts[1].rstrip(" "), texts[1][len(texts[1].rstrip(" ")):] + rest]
    ids = [lead + hf_encode(hf, texts[0])[0], hf_encode(hf, texts[1], first=not texts[0])[0],
           hf_encode(hf, texts[2], first=not (texts[0] + texts[1]))[0]]
    return texts, ids, lead


def fresh(hf, texts, chat):
    """transformers' encoding of the texts as one, and whether one of its tokens crosses a join between them."""
    enc = hf("".join(texts), add_special_tokens=not chat, return_offsets_mapping=True)
    joins = [len("".join(texts[:k])) for k in range(1, len(texts))]
    return enc["input_ids"], any(b < j < e for b, e in enc["offset_mapping"] for j in joins)


# contexts that meet the question and the template in different ways: after a sentence end, a line end, a
# word; non-ASCII and byte-fallback characters at the joins; a special-token string inside the document
CASES = [
    ("The sky is blue. The grass is green.", "Who is it?"),
    ("The sky is blue.\nThe grass is green.\n", "What colour is the grass?"),
    ("über straße 東京 数字 and the pass key is 31415", " What is the pass key?"),
    ("😀 emoji first. Then text ending in an emoji 😀", "\nQuestion: why?"),
    ("A document that mentions </s> and <|im_end|> and <|eot_id|> as text.", "Which tokens?"),
]
# contexts ending in a space, a period, a newline and nothing: issue 18's SmolLM2 examples first
ENDINGS = [
    ("The sky is blue. ", "What colour is the sky?"),
    ("Text. ", "Question: what?"),
    ("Is it blue.", "?"),
    ("The grass is green.\n", "Who?"),
    ("The grass is green", "?"),
    ("The grass is green", "er?"),
]


@pytest.mark.parametrize("context,question", CASES + ENDINGS)
def test_one_chunk_input_is_the_fresh_encoding_but_where_a_token_crosses_a_join(pair, context, question):
    """Header, context and question are transformers' encodings of their texts, each where it stands; so a
    one-chunk input is exactly `tokenizer(text)` (with --chat `apply_chat_template(tokenize=True)`) wherever
    no token of that encoding crosses a join, and where one does (Llama 3's ".\\n\\n" at the chat join) it
    reads the same text. The old code gave a crossing token to the context: 'Is it blue.' + '?' had an empty
    question on SmolLM2."""
    ours, hf = pair
    for chat in (False, True) if ours.chat_template else (False,):
        p = ours.encode_prompt(context, question, chat)
        texts, ids, _ = reference(hf, context, question, chat)
        assert [p.header, p.context, p.question] == ids
        whole, crossed = fresh(hf, texts, chat)
        if crossed:
            assert ours.decode(p.header + p.context + p.question) == hf.decode(whole, skip_special_tokens=True)
        else:
            assert p.header + p.context + p.question == whole
        assert p.context and p.question


def test_the_rule_at_the_joins(folders):
    """Spaces at a join go to the text after it; a token that would cross a join is encoded as the two sides'
    tokens. The context's ids do not depend on the question (a document session encodes them once)."""
    sp = load(folders["llama2_chat"])[0]
    p = sp.encode_prompt("The sky.", "Who?", chat=True)  # "[INST] The": the template's space starts "▁The"
    assert [sp.id_to_token(i) for i in p.header][-1] == "<0x5D>" and sp.id_to_token(p.context[0]) == "\u2581The"
    p = sp.encode_prompt("\u03a9\u03bb first", "Who?")  # a lone dummy "▁" before byte-fallback Ω
    assert p.header == [sp.bos_id] and sp.decode(p.context) == "\u03a9\u03bb first"
    assert sp.id_to_token(p.context[0]) == "\u2581" and sp.id_to_token(p.question[0]) == "Wh"
    p = sp.encode_prompt("The sky is blue. ", "What colour?")  # the context's last space starts "▁What"
    assert sp.decode(p.context) == "The sky is blue." and sp.id_to_token(p.question[0]).startswith("\u2581")
    bpe = load(folders["llama3_instruct"])[0]
    p = bpe.encode_prompt("The sky is blue.", "Who?", chat=True)  # a fresh encoding joins "." and "\n\n"
    assert bpe.id_to_token(p.context[-1]) == "." and bpe.decode(p.question).startswith("\n\nWho?")
    assert ".\u010a\u010a" in [bpe.id_to_token(i) for i in bpe.encode("The sky is blue.\n\nWho?")]
    for name in ("smollm2_like", "smollm2"):
        if folders[name] is None:
            continue
        tok = load(folders[name])[0]
        assert tok.decode(tok.encode_prompt("The sky is blue. ", "What colour is the sky?").question) == \
            " What colour is the sky?"
        assert tok.decode(tok.encode_prompt("Text. ", "Question: what?").question) == " Question: what?"
        assert tok.decode(tok.encode_prompt("Is it blue.", "?").question) == "?"
        for chat in (False, True):
            assert len({tuple(tok.encode_prompt("Is it blue.", q, chat).context) for q in ("?", " Why?", "\nWhy?")}) == 1


INSTRUCTION = "Read the text and answer the question at the end. Be concise.\n\n"


def test_instruction_goes_into_the_header(pair):
    """answer(instruction=...): the text is instruction + context + question; the instruction's tokens end the
    header (which every chunk input repeats), none of them are scored as the question."""
    ours, hf = pair
    context, question = "The sky is blue. The grass is green.", "\nWho is it?"
    plain = ours.encode_prompt(context, question)
    for chat in (False, True) if ours.chat_template else (False,):
        p = ours.encode_prompt(context, question, chat=chat, instruction=INSTRUCTION)
        texts, ids, _ = reference(hf, context, question, chat, INSTRUCTION)
        assert [p.header, p.context, p.question] == ids
        assert INSTRUCTION.strip() in ours.decode(p.header) and INSTRUCTION.strip() not in ours.decode(p.question)
        if not chat:
            assert ours.decode(p.header[len(plain.header):]).strip() == INSTRUCTION.strip()
            assert p.question == plain.question and ours.decode(p.context).strip() == context


def test_bos_exactly_when_transformers_adds_it(pair):
    ours, hf = pair
    added = hf("x")["input_ids"][:-len(hf("x", add_special_tokens=False)["input_ids"])]
    assert ours.encode_prompt("x", "y").header == added
    assert (ours.bos_id is not None) == bool(added)
    if ours.chat_template:  # the chat header is the rendered template's tokens, a BOS only where it prints one
        p = ours.encode_prompt("The sky.", "Who?", chat=True)
        text = hf.apply_chat_template([{"role": "user", "content": "The sky.\n\nWho?"}], tokenize=False,
                                      add_generation_prompt=True)
        assert p.header[0] == hf(text, add_special_tokens=False)["input_ids"][0]
        ids = p.header + p.context + p.question
        assert ids.count(hf.bos_token_id) == (text.count(hf.bos_token) if hf.bos_token else 0)


def test_bos_rule_per_folder(folders):
    want = {"llama2_chat": "<s>", "llama2_json": "<s>", "mistral_instruct": "<s>",
            "llama3_instruct": "<|begin_of_text|>", "qwen25_instruct": None, "smollm2_like": None,
            "smollm2": None}  # SmolLM2: bos_token named, none added
    for name, path in folders.items():
        if path is not None:
            assert T.load_tokenizer(path).bos_token == want[name], name


@pytest.mark.parametrize("name", ["smollm2_like", "smollm2"])
def test_smollm2_chat_header_keeps_its_first_token(folders, name):
    """The old code stripped the bos_token text from the rendered template: SmolLM2's system turn lost its
    <|im_start|>."""
    tok = tokenizers_of(folders, name)[0]
    header = tok.encode_prompt("ctx", "q?", chat=True).header
    assert tok.bos_id is None and header[0] == tok.token_id("<|im_start|>")
    assert tok.decode(header).startswith("system\nYou are a helpful AI assistant")


# ----------------------------------------------------------------------------------------------------
# Every chunk input

LONG = ("The sky is blue. The grass is green!\nA river is happy after the storm. Café naïve 東京.\n"
        "The pass key is 31415. Remember it. What a day?\nThe end of the story is near. Here we go again")
QUESTION = "What is the pass key?"


def chunk_inputs(ours, hf, context, question, chat, chunk_size, natural=False):
    """[(chunk input ids, the texts it stands for, whether it is a later chunk whose text does not start with a
    space)] for the chunks ParallelComp cuts (with natural: those cut at line or sentence ends at both ends).
    The texts: the header's, the characters the chunk's tokens cover (transformers' offsets), the question's. A
    chunk whose cut splits a character's bytes stands for no text and is left out."""
    import torch
    p = ours.encode_prompt(context, question, chat)
    (prefix, ctx, rest), _, _ = reference(hf, context, question, chat)
    ids, spans = hf_encode(hf, ctx, first=not prefix)
    assert ids == p.context
    strength = P.boundary_strength(ours.token_texts)[torch.tensor(p.context)]
    out = []
    for s, e in P.split_chunks(strength, chunk_size):
        inside = (s > 0 and spans[s][0] < spans[s - 1][1]) or (e < len(ids) and spans[e][0] < spans[e - 1][1])
        cut = (s == 0 or strength[s - 1] > 0) and (e == len(ids) or strength[e - 1] > 0)
        if not inside and (cut or not natural):
            text = ctx[spans[s][0]:spans[e - 1][1]]
            out.append((p.header + p.context[s:e] + p.question, (prefix, text, rest), s > 0 and text[:1] != " "))
    assert len(out) >= 3
    return out


@pytest.mark.parametrize("name", FOLDERS)
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("end", [". ", ".", ".\n", ""], ids=["space", "period", "newline", "nothing"])
def test_every_chunk_input_reads_header_chunk_and_the_whole_question(folders, name, chat, end):
    """Every chunk input decodes to the header text + its chunk's text + the whole question: nothing added or
    lost at the joins (the old code gave a token across the join to the context, so the question lost its first
    characters: with --chat on Llama 3 every chunk but the last read "...again.What is", and with a context ending
    in a space SmolLM2's question lost "What")."""
    ours, hf = tokenizers_of(folders, name, chat)
    for ids, texts, _ in chunk_inputs(ours, hf, LONG + end, QUESTION, chat, chunk_size=12):
        text = "".join(texts)
        for token in hf.added_tokens_decoder.values():
            text = text.replace(token.content, "") if token.special else text
        assert QUESTION in texts[2]
        assert ours.decode(ids).lstrip(" ") == text.lstrip(" ")  # (SentencePiece drops a leading space)


@pytest.mark.parametrize("name", FOLDERS)
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_chunk_ids_are_the_fresh_encoding_where_no_token_crosses_a_join(folders, name, chat):
    """The ids of a chunk cut at line / sentence ends are the tokenizer's own fresh encoding of the text it
    stands for wherever that encoding has no token across a join, but for one documented case: without --chat,
    a later chunk whose text does not start with a space has no dummy-prefix "▁" (SentencePiece would give a
    text of its own one; inside the whole prompt there is none)."""
    ours, hf = tokenizers_of(folders, name, chat)
    dummy = hf.convert_ids_to_tokens(hf("x", add_special_tokens=False)["input_ids"])[0] == "\u2581"
    checked = unspaced = crossing = 0
    for ids, texts, unspaced_chunk in chunk_inputs(ours, hf, LONG + ". " + LONG, " " + QUESTION, chat, 20,
                                                    natural=True):
        want, crossed = fresh(hf, texts, chat)
        if dummy and not chat and unspaced_chunk:
            unspaced += 1
            assert ids != want and ours.decode(ids) == hf.decode(want, skip_special_tokens=True)
        elif not crossed:
            assert ids == want, texts
            checked += 1
        crossing += crossed
    assert checked >= 1 and checked + crossing >= 3 and (unspaced >= 1 or chat or not dummy)


# ----------------------------------------------------------------------------------------------------
# Where the chat template comes from, and what it may use

def test_chat_template_jinja_file_wins_over_tokenizer_config(folders, tmp_path):
    path = shutil.copytree(folders["llama2_chat"], tmp_path / "both")
    write_json(path, "chat_template.jinja", MISTRAL_INSTRUCT)  # tokenizer_config.json still holds LLAMA2_CHAT
    ours, hf = T.load_tokenizer(str(path)), transformers.AutoTokenizer.from_pretrained(str(path))
    assert ours.chat_template == MISTRAL_INSTRUCT == hf.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(Exception, match="alternate"):  # Mistral's template refuses a system turn; Llama 2's not
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(T.CheckpointError, match="alternate"):
        ours.render_chat(messages)


def test_named_chat_templates_use_default(folders, tmp_path):
    path = str(shutil.copytree(folders["llama3_instruct"], tmp_path / "named"))
    edit_json(path, "tokenizer_config.json", chat_template=[
        {"name": "tool_use", "template": "TOOLS {{ messages[0]['content'] }}"},
        {"name": "default", "template": LLAMA3_INSTRUCT}])
    ours, hf = T.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    assert ours.chat_template == LLAMA3_INSTRUCT
    p = ours.encode_prompt("The sky", "Who?", chat=True)  # no token across a join ("." would join "\n\n")
    ref = hf.apply_chat_template([{"role": "user", "content": "The sky\n\nWho?"}], tokenize=True,
                                 add_generation_prompt=True)
    assert p.header + p.context + p.question == ids_of(ref)


# transformers' extras: strftime_now (Llama 3.1+ print today's date), {% break %} / {% continue %}, tojson
# without HTML escaping, namespace(), raise_exception
EXTRAS = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "Today Date: {{ strftime_now('%d %b %Y') }}\n{{ {'k': '<&>'} | tojson }}\n{{ m['content'] }}<|eot_id|>"
    "{% break %}{% endfor %}{% if ns.n == 0 %}{{ raise_exception('no user turn') }}{% endif %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_extras_render_as_in_transformers(folders, tmp_path):
    path = str(shutil.copytree(folders["llama3_instruct"], tmp_path / "extras"))
    write_json(path, "chat_template.jinja", EXTRAS)
    ours, hf = T.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "skipped"}, {"role": "user", "content": "first"},
                {"role": "user", "content": "never rendered"}]
    text = ours.render_chat(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from datetime import datetime
    assert f"Today Date: {datetime.now().strftime('%d %b %Y')}\n" in text and '{"k": "<&>"}' in text
    assert "skipped" not in text and "never rendered" not in text
    p = ours.encode_prompt("The sky", "Who?", chat=True)  # no token across a join ("." would join "\n\n")
    ref = hf.apply_chat_template([{"role": "user", "content": "The sky\n\nWho?"}], tokenize=True,
                                 add_generation_prompt=True)
    assert p.header + p.context + p.question == ids_of(ref)
    with pytest.raises(T.CheckpointError, match="no user turn"):
        ours.render_chat([{"role": "system", "content": "only"}])


# ----------------------------------------------------------------------------------------------------
# Decoding ids the tokenizer does not have

def test_decode_skips_ids_it_cannot_decode_and_says_so_once(folders, tmp_path, capsys):
    """A tokenizer.model folder with added tokens past the SentencePiece model (added_tokens_decoder) and a
    model vocabulary larger still: such ids used to crash decode with an IndexError."""
    path = str(shutil.copytree(folders["llama2_chat"], tmp_path / "extra"))
    added = {**read_json(path, "tokenizer_config.json")["added_tokens_decoder"],
             **added_tokens_decoder({"512": "<|tool|>"})}
    added["513"] = dict(added["512"], content="<plain>", special=False)
    edit_json(path, "tokenizer_config.json", added_tokens_decoder=added)
    ours, hf = T.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    assert ours.vocab_size == 514 == len(hf) and len(ours.token_texts) == 514
    assert ours.token_id("<|tool|>") == 512 and ours.id_to_token(513) == "<plain>"
    ids = ours.encode("the sky") + [512, 513] + ours.encode("is blue")
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert capsys.readouterr().err == ""
    assert ours.decode(ids + [600, 9999]) == ours.decode(ids)  # the model's extra ids: left out...
    assert ours.decode([600]) == ""
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "600" in err  # ... and said so once
    p = ours.encode_prompt("Use <|tool|> now.", "Why?")  # added tokens in text are single tokens, as there
    assert p.header + p.context + p.question == hf("Use <|tool|> now.Why?")["input_ids"]


def test_tokenizer_json_decode_of_unknown_ids_says_so(folders, capsys):
    tok = T.load_tokenizer(folders["llama3_instruct"])
    ids = tok.encode("the sky")
    assert tok.decode(ids + [tok.vocab_size + 5]) == "the sky"
    assert "warning" in capsys.readouterr().err
