"""Supervised fine-tuning examples: rows -> (token ids, trained-token mask), one function per step.

The public calls, shared with preference data (DPO builds chosen/rejected pairs on them):
  * `parse_row(record, fmt, fields)` -> `Example`: a row of one `data.example_format` checked and normalised into
    either a prompt/completion pair of strings or a conversation (messages, with how many lead the prompt);
    raises `BadRow` naming what is wrong (missing field, wrong type, unknown role, roles out of order, empty
    response).
  * `encode_example(example, tokenizer, template, loss_on, add_bos)` -> `Encoded(ids, mask)`: tokenized once,
    `mask[i] = 1` on every token the model must produce.
  * `encode_prompt_response(tokenizer, template, prompt, response, add_bos)`: the same for one prompt (a string
    or a list of messages) and one response string, with the mask on the response only.
  * `fit_to_length(encoded, max_tokens, truncation)`: data.truncation for an over-long example.

Which tokens are trained (data.loss_on):
  * prompt/completion (plain text, TRL's convention): the tokens of tokenize(prompt + completion) after the first
    len(tokenize(prompt)) tokens, plus eos. `all` trains every token.
  * conversations: the rendered conversation is tokenized once; the span of assistant turn i is the text between
    render(messages[:i], add_generation_prompt=True) and render(messages[:i + 1]), so it holds the turn's content
    and its end-of-turn markup, whatever the template's markup is. A token is trained when its characters overlap a
    span (transformers' assistant-mask rule). `assistant` trains every assistant turn, `completion` the turns after
    the prompt (a TRL conversational prompt/completion row) or else the last assistant turn, `all` everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import numpy as np

from maxlm.data.chat_template import ChatTemplate
from maxlm.data.hf_tokenizer import HfTokenizer
from maxlm.config.sft_checks import EXAMPLE_FORMATS

ROLES = ("system", "user", "assistant")
ALPACA_FIELDS = ("instruction", "input", "output")


class BadRow(ValueError):
    """A row that cannot be trained on; the message says why (the pipeline adds file:line)."""


class NoAssistantSpan(BadRow):
    """The template rendered an assistant turn as no text at all: a property of the template, not of the row."""


@dataclass(frozen=True)
class Fields:
    """Which field of a row holds what (data.prompt_field, data.completion_field, data.messages_field)."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


@dataclass(frozen=True)
class Example:
    """A checked row: a prompt/completion pair of strings, or `messages` whose first `n_prompt` form the prompt
    (0 for a plain conversation)."""

    prompt: str = ""
    completion: str = ""
    messages: tuple[dict[str, str], ...] = ()
    n_prompt: int = 0

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


@dataclass(frozen=True)
class Encoded:
    """Token ids [L] (int32) and the trained-token mask [L] (1 = the model must produce this token)."""

    ids: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _string(record: Mapping[str, Any], key: str) -> str:
    if key not in record or record[key] is None:
        raise BadRow(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise BadRow(f"field {key!r} is {type(value).__name__}, expected a string")
    return value


def check_messages(value: Any, key: str, *, must_end_with_assistant: bool = False) -> tuple[dict[str, str], ...]:
    """A conversation as a tuple of {role, content} dicts, or BadRow: roles are system (first only), then user
    and assistant alternating from user; contents are strings, assistant contents non-empty."""
    if not isinstance(value, list) or not value:
        raise BadRow(f"field {key!r} must be a non-empty list of {{role, content}} messages")
    out = []
    expect = "user"
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise BadRow(f"{key}[{i}] is {type(m).__name__}, expected a {{role, content}} mapping")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRow(f"{key}[{i}] has unknown role {role!r} (roles: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise BadRow(f"{key}[{i}].content is {type(content).__name__}, expected a string")
        if role == "system":
            if i != 0:
                raise BadRow(f"{key}[{i}]: a system message may only come first")
        elif role != expect:
            raise BadRow(f"{key}[{i}]: roles out of order ({role} where {expect} was expected)")
        else:
            expect = "assistant" if role == "user" else "user"
        if role == "assistant" and not content.strip():
            raise BadRow(f"{key}[{i}]: empty assistant message")
        out.append({"role": role, "content": content})
    if must_end_with_assistant and out[-1]["role"] != "assistant":
        raise BadRow(f"field {key!r} has no assistant message at the end")
    return tuple(out)


def alpaca_prompt(instruction: str, context: str) -> str:
    """The Alpaca layout: instruction, optional input, then the response header the output follows."""
    parts = [f"### Instruction:\n{instruction}\n\n"]
    if context.strip():
        parts.append(f"### Input:\n{context}\n\n")
    parts.append("### Response:\n")
    return "".join(parts)


def parse_row(record: Any, fmt: str, fields: Fields = Fields()) -> Example:
    """One row of `data.example_format` checked and normalised (BadRow otherwise)."""
    if not isinstance(record, Mapping):
        raise BadRow(f"row is {type(record).__name__}, expected an object")
    if fmt == "prompt_completion":
        prompt, completion = record.get(fields.prompt), record.get(fields.completion)
        if isinstance(prompt, list):  # TRL's conversational prompt/completion: the completion is the last turn(s)
            head = check_messages(prompt, fields.prompt)
            tail_raw = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
            whole = check_messages(list(head) + list(tail_raw or []), f"{fields.prompt}+{fields.completion}",
                                   must_end_with_assistant=True)
            if len(whole) == len(head):
                raise BadRow(f"field {fields.completion!r} has no messages")
            return Example(messages=whole, n_prompt=len(head))
        prompt, completion = _string(record, fields.prompt), _string(record, fields.completion)
        if not completion.strip():
            raise BadRow(f"empty {fields.completion!r}")
        return Example(prompt=prompt, completion=completion)
    if fmt == "alpaca":
        instruction, output = _string(record, ALPACA_FIELDS[0]), _string(record, ALPACA_FIELDS[2])
        context = record.get(ALPACA_FIELDS[1]) or ""
        if not isinstance(context, str):
            raise BadRow(f"field {ALPACA_FIELDS[1]!r} is {type(context).__name__}, expected a string")
        if not output.strip():
            raise BadRow(f"empty {ALPACA_FIELDS[2]!r}")
        return Example(prompt=alpaca_prompt(instruction, context), completion=output)
    if fmt == "messages":
        messages = check_messages(record.get(fields.messages), fields.messages)
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow(f"field {fields.messages!r} has no assistant message")
        return Example(messages=messages)
    raise ValueError(f"parse_row: example format {fmt!r} is not one of {', '.join(EXAMPLE_FORMATS[1:])}")


def _plain_ids(tokenizer: Any, text: str, add_bos: bool) -> list[int]:
    """`tokenizer(text)` as transformers gives it: a Hugging Face tokenizer's post-processor (e.g. a leading bos),
    or for sentencepiece models bos when data.add_bos is set."""
    if isinstance(tokenizer, HfTokenizer):
        return tokenizer.encode(text, add_special_tokens=True)
    head = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    return head + list(tokenizer.encode(text))


def encode_prompt_completion(tokenizer: Any, prompt: str, completion: str, add_bos: bool = True,
                             loss_on: str = "completion") -> Encoded:
    """TRL's convention: ids = tokenize(prompt + completion) + [eos]; trained = everything after the first
    len(tokenize(prompt)) tokens (eos included)."""
    n_prompt = len(_plain_ids(tokenizer, prompt, add_bos))
    ids = _plain_ids(tokenizer, prompt + completion, add_bos)
    eos = tokenizer.eos_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    mask = np.zeros(len(ids), np.int32)
    mask[0 if loss_on == "all" else min(n_prompt, len(ids)):] = 1
    return Encoded(np.asarray(ids, np.int32), mask)


def assistant_spans(template: ChatTemplate, messages: Sequence[Mapping[str, str]], turns: Sequence[int],
                    full: str) -> list[tuple[int, int]]:
    """[start, end) character spans in `full` (the rendered conversation) of the assistant turns `turns`, found
    by rendering prefixes. BadRow when the template renders a prefix differently from the whole conversation."""
    spans = []
    for i in turns:
        before = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[:i + 1])
        if not upto.startswith(before) or not full.startswith(upto):
            raise BadRow(f"{template.name} renders messages[:{i + 1}] as text that is not a prefix of the whole "
                         "conversation, so the assistant turn cannot be located")
        if len(upto) == len(before):
            raise NoAssistantSpan(f"{template.name} renders assistant message {i} as no text")
        spans.append((len(before), len(upto)))
    return spans


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """1 on every token whose characters overlap a span (an empty offset counts as one character)."""
    mask = np.zeros(len(offsets), np.int32)
    for t, (s, e) in enumerate(offsets):
        e = max(e, s + 1)
        mask[t] = any(s < b and e > a for a, b in spans)
    return mask


def _trained_turns(example: Example, loss_on: str) -> list[int]:
    assistant = [i for i, m in enumerate(example.messages) if m["role"] == "assistant"]
    if loss_on == "assistant":
        return assistant
    if example.n_prompt:
        return [i for i in assistant if i >= example.n_prompt]
    return assistant[-1:]


def encode_messages(tokenizer: Any, template: ChatTemplate, messages: Sequence[Mapping[str, str]],
                    turns: Sequence[int] | None, add_bos: bool = True) -> Encoded:
    """Renders and tokenizes a conversation once; the mask covers the assistant turns `turns` (None: all tokens).

    Ids equal transformers' `apply_chat_template(messages, tokenize=True)` for a Hugging Face tokenizer (the
    template writes its own bos). `add_bos` is unused for them; sentencepiece templates write `{{ bos_token }}` too.
    """
    try:
        full = template.render(messages)
        ids, offsets = tokenizer.encode_with_offsets(full)
        spans = assistant_spans(template, messages, turns, full) if turns is not None else [(0, len(full))]
    except jinja2.TemplateError as e:
        raise BadRow(f"{template.name} failed to render the conversation ({e})") from None
    mask = _mask_from_spans(offsets, spans) if turns is not None else np.ones(len(ids), np.int32)
    return Encoded(np.asarray(ids, np.int32), mask)


def encode_example(example: Example, tokenizer: Any, template: ChatTemplate | None, loss_on: str = "assistant",
                   add_bos: bool = True) -> Encoded:
    """A parsed row as ids and trained-token mask (see the module docstring for which tokens are trained)."""
    if not example.is_chat:
        return encode_prompt_completion(tokenizer, example.prompt, example.completion, add_bos, loss_on)
    if template is None:
        raise ValueError("encode_example: a conversation needs a chat template")
    turns = None if loss_on == "all" else _trained_turns(example, loss_on)
    return encode_messages(tokenizer, template, example.messages, turns, add_bos)


def encode_prompt_response(tokenizer: Any, template: ChatTemplate | None, prompt: str | Sequence[Mapping[str, str]],
                           response: str, add_bos: bool = True) -> Encoded:
    """One prompt and one response, the mask on the response only (with its eos or end-of-turn).

    A string prompt is plain text (TRL's prompt/completion convention); a list of messages is a conversation that
    the response answers as the next assistant turn, rendered with `template`. Preference data (chosen and
    rejected responses to one prompt) is two calls.
    """
    if isinstance(prompt, str):
        return encode_prompt_completion(tokenizer, prompt, response, add_bos)
    if template is None:
        raise ValueError("encode_prompt_response: a conversational prompt needs a chat template")
    messages = check_messages(list(prompt) + [{"role": "assistant", "content": response}], "prompt+response",
                              must_end_with_assistant=True)
    return encode_messages(tokenizer, template, messages, [len(messages) - 1], add_bos)


def fit_to_length(enc: Encoded, max_tokens: int, truncation: str) -> tuple[Encoded | None, bool]:
    """(example, truncated) with at most `max_tokens` tokens (seq_len + 1: inputs and targets are shifted by one).

    `drop` returns None for an over-long example. `left` cuts the prompt from the left, keeping at least one token
    before the first trained one (it is the input that predicts it); if the rest is still too long, the end is cut.
    The caller drops the result when no trained target is left (mask[1:] all zero).
    """
    n = len(enc)
    if n <= max_tokens:
        return enc, False
    if truncation == "drop":
        return None, False
    trained = np.flatnonzero(enc.mask)
    first = int(trained[0]) if len(trained) else n
    start = min(n - max_tokens, max(first - 1, 0))
    sl = slice(start, start + max_tokens)
    return Encoded(enc.ids[sl], enc.mask[sl]), True
