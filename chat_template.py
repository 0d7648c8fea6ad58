"""--chat: the checkpoint's own chat template, found and rendered as transformers finds and renders it, and split
around the context so that every chunk input is a user turn (a side file of tokenizer.py, as gpt-fast keeps tp.py
beside its three files).

find_template: chat_template.jinja first (what transformers 5 saves and reads first), else tokenizer_config.json's
chat_template. render: a jinja2 sandbox with transformers' options, globals and filters. chat_parts: the text
before and after the context in a rendered one-message conversation.
"""
from __future__ import annotations

import json
import os
from datetime import datetime

from model import CheckpointError

CONTEXT_MARK = "\x00CONTEXT\x00"  # stands for the context while the template renders


def find_template(ckpt_dir: str, tok_cfg: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template: a string, or a list of named templates of
    which "default" is the one used; None when the folder has none."""
    path = os.path.join(ckpt_dir, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) else None


def _environment():
    """A sandboxed jinja2 environment as transformers builds it: trim_blocks / lstrip_blocks, the loop controls,
    the {% generation %} tag, tojson without HTML escaping, raise_exception and strftime_now."""
    try:
        import jinja2
        import jinja2.ext
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
    return env


def render(template: str | None, messages: list[dict], special_tokens: dict[str, str],
           add_generation_prompt: bool = True) -> str:
    """The template rendered as apply_chat_template(tokenize=False) renders it; special_tokens are the named
    special tokens it may use (bos_token, eos_token, ...)."""
    if not template:
        raise CheckpointError("--chat: this checkpoint has no chat template (chat_template.jinja or "
                              "tokenizer_config.json); drop --chat")
    from jinja2 import TemplateError
    env = _environment()
    try:
        return env.from_string(template).render(messages=messages, tools=None, documents=None,
                                                add_generation_prompt=add_generation_prompt, **special_tokens)
    except TemplateError as e:
        raise CheckpointError(f"--chat: the checkpoint's chat template failed ({e}); drop --chat") from None


def chat_parts(template: str | None, special_tokens: dict[str, str], question: str,
               instruction: str = "") -> tuple[str, str]:
    """The template rendered for one user message (the instruction, the context, a blank line, the question) and
    split around the context: (text before the context, text after it, ending with the assistant header). The
    text is the whole rendered template, a BOS it prints included (transformers then adds no other)."""
    message = {"role": "user", "content": instruction + CONTEXT_MARK + "\n\n" + question}
    text = render(template, [message], special_tokens)
    if text.count(CONTEXT_MARK) != 1:
        raise CheckpointError("--chat: the checkpoint's chat template drops or repeats the user's message; "
                              "drop --chat")
    prefix, _, rest = text.partition(CONTEXT_MARK)
    return prefix, rest
