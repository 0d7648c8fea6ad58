"""--chat: the checkpoint's own chat template, split around the context so every chunk is a user turn."""
import shutil

import pytest

from conftest import edit_json
from model import CheckpointError
from tokenizer import load_tokenizer

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture
def chat_dir(tmp_path, bpe_tokenizer_dir):
    path = str(tmp_path / "chat")
    shutil.copytree(bpe_tokenizer_dir, path)
    edit_json(path, "tokenizer_config.json", chat_template=LLAMA3_TEMPLATE)
    return path


def test_chat_template_is_split_around_the_context(chat_dir):
    tok = load_tokenizer(chat_dir)
    prefix, question = tok.chat_parts("Who is it?")
    # the whole rendered template, the BOS it prints included: transformers encodes that text and adds no other
    assert prefix == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert question == "\n\nWho is it?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = tok.encode(question)
    assert tok.token_id("<|eot_id|>") in ids and tok.token_id("<|start_header_id|>") in ids  # special tokens
    p = tok.encode_prompt("The sky is blue.", "Who is it?", chat=True)
    assert p.header == tok.encode(prefix) and p.header.count(tok.bos_id) == 1  # one BOS, from the text
    # each part encoded apart: the question keeps its "\n\n", which one encoding of the whole text would join
    # with the context's "." into one token
    assert p.context == tok.encode("The sky is blue.") and p.question == tok.encode(question)
    assert tok.encode("The sky is blue." + question)[len(p.context) - 1] != p.context[-1]


def test_chat_without_template_is_a_clear_error(bpe_tokenizer_dir):
    with pytest.raises(CheckpointError, match="no chat template"):
        load_tokenizer(bpe_tokenizer_dir).chat_parts("Who?")
