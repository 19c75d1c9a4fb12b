"""Checks of the `lora.*` keys, called by check_static: every mistake is one line naming the key and the fix."""

from __future__ import annotations

import os
import re

from maxlm.config.schema import LORA_TARGET_NAMES, Config, ConfigError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def target_kind(target: str) -> str:
    """`name` for a bare identifier (which must be one of LORA_TARGET_NAMES), else `pattern` (a regular expression
    searched in a weight's path such as `layers/attn/q`)."""
    return "name" if _NAME.match(target) else "pattern"


def check_lora(cfg: Config) -> None:
    lo = cfg.lora
    if lo.rank <= 0:
        raise ConfigError(f"lora.rank must be a positive integer (the adapters' inner size, e.g. 8), got {lo.rank}")
    if lo.alpha <= 0:
        raise ConfigError(f"lora.alpha must be positive (the adapter scale is alpha / rank), got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if lo.base_dtype not in ("", "float32", "bfloat16"):
        raise ConfigError(f"lora.base_dtype={lo.base_dtype!r} is not one of '' (model.param_dtype), float32, bfloat16")
    if not isinstance(lo.targets, list) or not lo.targets or not all(isinstance(t, str) and t for t in lo.targets):
        raise ConfigError(f"lora.targets must be a non-empty list of projection names or patterns, got "
                          f"{lo.targets!r}; valid names: {', '.join(LORA_TARGET_NAMES)}")
    for t in lo.targets:
        if target_kind(t) == "name" and t not in LORA_TARGET_NAMES:
            raise ConfigError(f"lora.targets: {t!r} is not a projection name; valid names: "
                              f"{', '.join(LORA_TARGET_NAMES)} (or a pattern such as 'attn/(q|v)$')")
        if target_kind(t) == "pattern":
            try:
                re.compile(t)
            except re.error as e:
                raise ConfigError(f"lora.targets: {t!r} is not a valid regular expression ({e})") from None
    path = lo.load_adapter_from
    if path and "://" not in path and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(f"lora.load_adapter_from: {path} does not exist; give a PEFT adapter directory "
                          "(adapter_config.json + adapter_model.safetensors) or a maxlm LoRA run's checkpoint")
    if path and not lo.enabled:
        raise ConfigError("lora.load_adapter_from is set but lora.enabled is false; set lora.enabled=true")
