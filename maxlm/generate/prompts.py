"""Prompts from the command line or a JSONL file, turned into decoding requests.

A prompts file has one JSON object per line, with exactly one of
  {"prompt": "text"}                                  encoded with the tokenizer (bos first when data.add_bos),
  {"messages": [{"role": ..., "content": ...}, ...]}  rendered with the chat template (data.chat_template),
  {"prompt_ids": [1, 2, 3]}                           used as given;
and optionally "max_new_tokens", "seed" (default: generate.seed + the prompt's index) and "stop" (a list of
strings) for that line. A line that breaks these
rules stops the command with one line naming file:line (exit 2): a prompt is a request, not training data, so it
is never skipped silently.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from maxlm.config import Config, ConfigError, GenerateConfig
from maxlm.generate.engine import Request
from maxlm.generate.sampling import SamplingParams

PROMPT_KEYS = ("prompt", "messages", "prompt_ids")


def sampling_from(g: GenerateConfig) -> SamplingParams:
    return SamplingParams(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, min_p=g.min_p, seed=g.seed)


def chat_ids(tokenizer: Any | None, chat_template: str, messages: list[dict[str, Any]], where: str) -> list[int]:
    """The conversation rendered with the chat template (`data.chat_template`, as SFT renders it: the template
    writes its own bos) and ended with the assistant's turn opener, then tokenized."""
    import jinja2

    from maxlm.data.chat_template import resolve_chat_template

    if tokenizer is None:
        raise ConfigError(f"{where}: \"messages\" need a tokenizer; set data.tokenizer")
    template = resolve_chat_template(chat_template, tokenizer)
    try:
        text = template.render(messages, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise ConfigError(f"{where}: {template.name} failed to render these messages ({e})") from None
    return tokenizer.encode_with_offsets(text)[0]


def text_ids(tokenizer: Any | None, text: str, add_bos: bool, where: str) -> list[int]:
    """A plain prompt as SFT tokenizes one (maxlm.data.sft): a Hugging Face tokenizer's own post-processor (e.g.
    Llama's bos), or bos for maxlm's sentencepiece models when data.add_bos is set."""
    from maxlm.data.hf_tokenizer import HfTokenizer

    if tokenizer is None:
        raise ConfigError(f"{where}: a text prompt needs a tokenizer; set data.tokenizer (or give prompt_ids)")
    if isinstance(tokenizer, HfTokenizer):
        return tokenizer.encode(text, add_special_tokens=True)
    return ([tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []) + list(tokenizer.encode(text))


def request_from_line(obj: Any, cfg: Config, tokenizer: Any | None, where: str, index: int = 0) -> Request:
    """One prompts-file object -> a Request (ConfigError naming `where` on anything malformed). Its seed is the
    line's "seed", else generate.seed + `index` (the prompt's place in the file), so two prompts never share a
    random stream and each is reproducible whatever batch it lands in."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object with one of {', '.join(PROMPT_KEYS)}")
    given = [k for k in PROMPT_KEYS if k in obj]
    if len(given) != 1:
        raise ConfigError(f"{where}: give exactly one of {', '.join(PROMPT_KEYS)} (got {given or 'none'})")
    key = given[0]
    g, add_bos, chat_template = cfg.generate, cfg.data.add_bos, cfg.data.chat_template
    value = obj[key]
    if key == "prompt":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: \"prompt\" must be a non-empty string")
        ids = text_ids(tokenizer, value, add_bos, where)
    elif key == "messages":
        if not (isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                         for m in value)):
            raise ConfigError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        ids = chat_ids(tokenizer, chat_template, value, where)
    else:
        if not (isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in value)):
            raise ConfigError(f"{where}: \"prompt_ids\" must be a non-empty list of integers")
        ids = list(value)
    sampling = replace(sampling_from(g), seed=g.seed + index)
    if "seed" in obj:
        if not isinstance(obj["seed"], int):
            raise ConfigError(f"{where}: \"seed\" must be an integer")
        sampling = replace(sampling, seed=obj["seed"])
    max_new = obj.get("max_new_tokens", g.max_new_tokens)
    if not isinstance(max_new, int) or max_new < 1:
        raise ConfigError(f"{where}: \"max_new_tokens\" must be a positive integer")
    stop = obj.get("stop", g.stop)
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ConfigError(f"{where}: \"stop\" must be a list of non-empty strings")
    return Request(ids, max_new, sampling, tuple(stop))


def read_prompts_file(path: str, cfg: Config, tokenizer: Any | None) -> list[Request]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"--prompts-file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--prompts-file {path}: not UTF-8 text") from None
    requests = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from None
        requests.append(request_from_line(obj, cfg, tokenizer, f"{path}:{n}", len(requests)))
    if not requests:
        raise ConfigError(f"--prompts-file {path} has no prompts (one JSON object per line)")
    return requests
