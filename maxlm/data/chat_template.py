"""Chat templates rendered with jinja2 the way transformers renders them, so token ids match `apply_chat_template`.

transformers compiles every template in an `ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`,
the `loopcontrols` extension and a `{% generation %}` block tag (used by templates that mark assistant text), and
gives it: a `tojson` filter that is plain `json.dumps` (no HTML escaping, `ensure_ascii=False`), the globals
`raise_exception`, `strftime_now`, `dict` and `namespace`, and the variables `messages`, `tools`, `documents`,
`add_generation_prompt` plus the tokenizer's named special tokens (`bos_token`, `eos_token`, ...). Messages reach
the template with their None-valued keys dropped. This module sets up the same environment (behaviour reproduced
from transformers' utils/chat_template_utils.py, not its code) and picks the template `data.chat_template` names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from maxlm.config import ConfigError
from maxlm.config.sft_checks import TEMPLATE_CHOICES

# The built-in template: ChatML (one `<|im_start|>role\ncontent<|im_end|>\n` block per message), preceded by the
# tokenizer's bos token when it has one. `maxlm tokenizer train` gives sentencepiece models both markers as pieces.
CHATML_TEMPLATE = (
    "{% if bos_token is defined %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_END_OF_TURN = "<|im_end|>"


class _GenerationTag(jinja2.ext.Extension):
    """Parses `{% generation %}...{% endgeneration %}` and renders its body unchanged. maxlm finds assistant spans
    by rendering prefixes, so it needs no markers, but templates written for transformers' assistant masks use the
    tag and must still compile."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes (templates are untrusted code)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's Namespace takes self positionally
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


def _dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return dict(*args, **kwargs)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_dict,
                       namespace=_SafeNamespace)
    return env


def plain_messages(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the template sees them: plain dicts without None-valued keys (what transformers passes)."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with. `name` says where it came from, for
    error messages ("chatml", a file path, or "<tokenizer dir>'s own"). Pickles as its source text."""

    def __init__(self, source: str, name: str, specials: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.name = name
        self.specials = dict(specials or {})
        try:
            self._compiled = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ConfigError(f"data.chat_template: {name} does not compile (line {e.lineno}: {e.message})") from None

    def render(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation as text. Raises jinja2.TemplateError when the template rejects it (e.g. its own
        `raise_exception` on roles out of order)."""
        return self._compiled.render(messages=plain_messages(messages), tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.specials)

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source, "name": self.name, "specials": self.specials}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["source"], state["name"], state["specials"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name})"


def resolve_chat_template(choice: str, tokenizer: Any) -> ChatTemplate:
    """The template `data.chat_template` names: `auto` (the tokenizer's own, else ChatML), `tokenizer` (its own,
    required), `chatml` (built in), or a path to a jinja file. Rendered with the tokenizer's special tokens."""
    specials = tokenizer.special_tokens
    own = tokenizer.chat_template
    if choice == "chatml" or (choice == "auto" and not own):
        return ChatTemplate(CHATML_TEMPLATE, "chatml", specials)
    if choice in ("auto", "tokenizer"):
        if not own:
            raise ConfigError(f"data.chat_template=tokenizer: {tokenizer.path} has no chat template; set "
                              "data.chat_template=chatml or a path to a .jinja file")
        return ChatTemplate(own, f"{tokenizer.path}'s own template", specials)
    if not os.path.isfile(choice):
        raise ConfigError(f"data.chat_template: {choice!r} is neither one of {', '.join(TEMPLATE_CHOICES)} nor a "
                          "jinja file")
    with open(choice, encoding="utf-8") as f:
        return ChatTemplate(f.read(), choice, specials)
