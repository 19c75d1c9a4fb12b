"""Hugging Face tokenizer directories (`tokenizer.json` + `tokenizer_config.json`), read without transformers.

A model converted with `maxlm convert from-hf` fine-tunes with its own tokenizer and chat template, so the data
pipeline must tokenize exactly as transformers does. transformers' fast tokenizers are the `tokenizers` library
underneath: loading `tokenizer.json` with `tokenizers.Tokenizer.from_file` gives the same ids, and the directory's
`tokenizer_config.json` (plus `chat_template.jinja`, where transformers 5 saves the template) supplies what the
template sees: the named special tokens (`bos_token`, `eos_token`, ...; transformers' `special_tokens_map`) and the
template text itself.

`load_text_tokenizer` is the one entry point for `data.tokenizer`: a directory is a Hugging Face tokenizer, a file a
sentencepiece model (maxlm.data.tokenizer). Both expose `encode`, `encode_with_offsets`, `decode`, `vocab_size`,
`bos_id`, `eos_id`, `special_tokens`, `chat_template` and `token_id`, which is all the SFT code needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

from maxlm.config import ConfigError

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names its `special_tokens_map` passes to every chat template.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
LEGACY_SPECIALS_FILE = "special_tokens_map.json"


class TextTokenizer(Protocol):
    """What the SFT pipeline needs from either tokenizer kind."""

    path: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def special_tokens(self) -> dict[str, str]: ...

    @property
    def chat_template(self) -> str | None: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, token: str) -> int | None: ...


def _token_text(value: Any) -> str | None:
    """A special token as saved by transformers: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: cannot read {path} ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"data.tokenizer: {path} is not a JSON object")
    return data


def _pick_template(value: Any, where: str) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of {name, template} whose `default` is used
    (what transformers' get_chat_template picks when no name is given)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ConfigError(f"data.tokenizer: {where} has several chat templates ({', '.join(map(str, named))}) and "
                          "none named 'default'; set data.chat_template to a jinja file")
    raise ConfigError(f"data.tokenizer: {where}: chat_template must be a string, got {type(value).__name__}")


class HfTokenizer:
    """A Hugging Face fast tokenizer directory behind the TextTokenizer calls.

    Pickles as the JSON text of the tokenizer (not a path), so grain worker processes get a working copy.
    """

    def __init__(self, tokenizer_json: str, specials: dict[str, str], chat_template: str | None,
                 path: str = "") -> None:
        from tokenizers import Tokenizer as _Backend

        self.path = path
        self._json = tokenizer_json
        self._tok = _Backend.from_str(tokenizer_json)
        self._specials = dict(specials)
        self._template = chat_template

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int | None:
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    @property
    def bos_id(self) -> int | None:
        tok = self._specials.get("bos_token")
        return self.token_id(tok) if tok else None

    @property
    def eos_id(self) -> int | None:
        tok = self._specials.get("eos_token")
        return self.token_id(tok) if tok else None

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._specials)

    @property
    def chat_template(self) -> str | None:
        return self._template

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; `add_special_tokens=True` applies the tokenizer's post-processor (e.g. Llama's bos), as
        `tokenizer(text)` does in transformers. Chat templates write their markers as text, so the default is off
        (what apply_chat_template passes)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids (no post-processor) and each token's [start, end) character span in `text`."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "json": self._json, "specials": self._specials, "template": self._template}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["json"], state["specials"], state["template"], state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"HfTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def load_hf_tokenizer(path: str) -> HfTokenizer:
    """Reads a directory written by transformers' `save_pretrained` (or downloaded from the Hub)."""
    tok_file = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(tok_file):
        raise ConfigError(f"data.tokenizer: {path} is a directory without {TOKENIZER_FILE}; give a Hugging Face "
                          "tokenizer directory (fast tokenizer) or a sentencepiece .model file")
    config_file = os.path.join(path, CONFIG_FILE)
    config = _read_json(config_file) if os.path.isfile(config_file) else {}
    legacy_file = os.path.join(path, LEGACY_SPECIALS_FILE)
    legacy = _read_json(legacy_file) if os.path.isfile(legacy_file) else {}
    specials = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name, legacy.get(name)))
        if text is not None:
            specials[name] = text
    template = _pick_template(config.get("chat_template"), config_file)
    template_file = os.path.join(path, TEMPLATE_FILE)
    if os.path.isfile(template_file):  # transformers 5 saves the template here, and it wins over the config's
        with open(template_file, encoding="utf-8") as f:
            template = f.read()
    with open(tok_file, encoding="utf-8") as f:
        text = f.read()
    try:
        return HfTokenizer(text, specials, template, path)
    except Exception as e:  # the Rust backend raises plain Exceptions with a parse message
        raise ConfigError(f"data.tokenizer: {tok_file} is not a tokenizers JSON file ({e})") from None


def load_text_tokenizer(path: str) -> TextTokenizer:
    """`data.tokenizer`: a Hugging Face tokenizer directory, or a sentencepiece model file."""
    if os.path.isdir(path):
        return load_hf_tokenizer(path)
    from maxlm.data.tokenizer import load_tokenizer

    return load_tokenizer(path)
