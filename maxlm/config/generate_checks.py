"""Checks of the `generate` section (decoding defaults); the sampling flags of `maxlm generate` / `maxlm eval` are
written into these keys before loading, so a bad flag is the same one-line error as a bad YAML key."""

from __future__ import annotations

from maxlm.config.schema import ConfigError, GenerateConfig


def check_generate(g: GenerateConfig) -> None:
    for key, val in [("generate.max_length", g.max_length), ("generate.top_k", g.top_k),
                     ("generate.temperature", g.temperature), ("generate.min_p", g.min_p)]:
        if val < 0:
            raise ConfigError(f"{key} must be >= 0, got {val}")
    for key, val in [("generate.batch_size", g.batch_size), ("generate.max_new_tokens", g.max_new_tokens)]:
        if val < 1:
            raise ConfigError(f"{key} must be >= 1, got {val}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generate.top_p (--top-p) must be in (0, 1], got {g.top_p}")
    if g.min_p > 1:
        raise ConfigError(f"generate.min_p (--min-p) must be in [0, 1], got {g.min_p}")
    if not all(isinstance(x, str) and x for x in g.stop):
        raise ConfigError(f"generate.stop must be a list of non-empty strings, got {g.stop!r}")
