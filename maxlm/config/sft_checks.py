"""Checks of the SFT keys of the `data` section (example formats, templates, masks, truncation) and of
`train.objective: sft`, run on every config load before anything compiles.

Part of the config package (imports nothing above it, nothing heavy): the names of the choices live here, and the modules that
implement them (maxlm.data.sft, maxlm.data.chat_template) import them from here.
"""

from __future__ import annotations

import os

from maxlm.config.schema import Config, ConfigError

EXAMPLE_FORMATS = ("text", "prompt_completion", "messages", "alpaca", "preference")  # preference: maxlm.data.preference
LOSS_ON = ("completion", "assistant", "all")
TRUNCATIONS = ("drop", "left")
TEMPLATE_CHOICES = ("auto", "tokenizer", "chatml")  # or a path to a .jinja file
SFT_SOURCE_FORMATS = ("jsonl", "parquet")


def _choice(value: str, options: tuple[str, ...], key: str, hint: str = "") -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(options)}{hint}")


def check_sft(cfg: Config, comps: list) -> None:
    """`comps` are the mixture components (maxlm.config.data_spec.MixtureComponent) with their own example formats."""
    d = cfg.data
    _choice(d.example_format, EXAMPLE_FORMATS, "data.example_format")
    _choice(d.loss_on, LOSS_ON, "data.loss_on")
    _choice(d.truncation, TRUNCATIONS, "data.truncation", " (left: cut the prompt from the left, keep the response)")
    for key in ("prompt_field", "completion_field", "messages_field"):
        if not isinstance(getattr(d, key), str) or not getattr(d, key):
            raise ConfigError(f"data.{key}: expected a field name, got {getattr(d, key)!r}")
    if d.chat_template not in TEMPLATE_CHOICES and not os.path.isfile(os.path.expanduser(d.chat_template)):
        raise ConfigError(f"data.chat_template={d.chat_template!r} is neither one of {', '.join(TEMPLATE_CHOICES)} "
                          "nor an existing .jinja file")
    sft = [c for c in comps if c.example_format != "text"]
    for c in sft:
        where = f"data.mixture ({c.name})" if d.mixture else "data.source"
        if c.format not in SFT_SOURCE_FORMATS:
            raise ConfigError(f"{where}: example_format={c.example_format} reads rows from "
                              f"{' or '.join(SFT_SOURCE_FORMATS)} files, not format {c.format}")
    if sft and len(sft) != len(comps):
        raise ConfigError("data.mixture: SFT sources (example_format other than text) cannot mix with pretraining "
                          "documents; give every source an example_format, or convert the documents to rows")
    if sft and d.cache_dir:
        raise ConfigError("data.cache_dir holds pretraining documents; SFT rows are read from their files (unset "
                          "data.cache_dir)")
    if cfg.train.objective == "sft" and not sft:
        raise ConfigError("train.objective=sft needs SFT rows: set data.example_format to prompt_completion, "
                          "messages or alpaca (and data.source to jsonl or parquet)")
