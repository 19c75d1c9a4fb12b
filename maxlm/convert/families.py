"""The Hugging Face families maxlm converts, and config.json -> `model:` section (no jax: `maxlm config` stays light).

`ARCHITECTURES` is the registry of family tables (llama.py, mistral.py, qwen.py, mixtral.py, qwen3_moe.py). Reading
a config.json, finding its family, mapping it to ModelConfig fields and resolving `model.from_hf` happen here;
moving tensors (hf.py) builds on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from maxlm.config import Config, ConfigError, ModelConfig, check_static, parse_overrides
from maxlm.convert.llama import LLAMA, LLAMA_REWARD
from maxlm.convert.mapping import REQUIRED, Architecture
from maxlm.convert.mistral import MISTRAL
from maxlm.convert.mixtral import MIXTRAL
from maxlm.convert.qwen import QWEN2, QWEN3
from maxlm.convert.qwen3_moe import QWEN3_MOE

# Order matters for export: a maxlm model goes to the first family whose `fixed` options it has (a dense model
# without a window is a Llama, with one a Mistral).
ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (LLAMA, MISTRAL, QWEN2, QWEN3, MIXTRAL, QWEN3_MOE)}
# Reward models (model.head=scalar), by Hugging Face class: config.json names it in `architectures`.
SEQUENCE_CLASSIFIERS: dict[str, Architecture] = {a.hf_class: a for a in (LLAMA_REWARD,)}
CONFIG_FILE = "config.json"


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{hf_dir}: no {CONFIG_FILE}; give a Hugging Face model directory")
    with open(path) as f:
        return json.load(f)


def architecture_of(hf: dict[str, Any], where: str) -> Architecture:
    for name in hf.get("architectures") or []:
        if name in SEQUENCE_CLASSIFIERS and SEQUENCE_CLASSIFIERS[name].model_type == hf.get("model_type"):
            return SEQUENCE_CLASSIFIERS[name]
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported; maxlm converts "
                          f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def architecture_for(cfg: ModelConfig) -> Architecture:
    """The family a maxlm model exports as: a causal LM, or a sequence classifier for model.head=scalar."""
    if cfg.head == "scalar":
        for arch in SEQUENCE_CLASSIFIERS.values():
            if arch.matches(cfg):
                return arch
        raise ConfigError("a reward model (model.head=scalar) exports as "
                          f"{', '.join(SEQUENCE_CLASSIFIERS)} only: it needs a dense Llama backbone (model.ffn=mlp, "
                          "no sliding window)")
    for arch in ARCHITECTURES.values():
        if arch.matches(cfg):
            return arch
    # Name what each architecture would need, so that e.g. a sigmoid-routed MoE does not read as an `ffn` problem.
    needs = "; ".join(f"{a.model_type} needs " + ", ".join(f"model.{k}={v!r} (here {getattr(cfg, k)!r})"
                                                           for k, v in a.fixed.items() if getattr(cfg, k) != v)
                      for a in sorted(ARCHITECTURES.values(), key=lambda a: a.model_type))
    raise ConfigError(f"no Hugging Face architecture matches this model: {needs}")


def model_fields_from_hf(hf: dict[str, Any], where: str) -> tuple[Architecture, dict[str, Any]]:
    """config.json -> the ModelConfig fields it determines (shape, RoPE, norm eps, tying, the fixed options)."""
    arch = architecture_of(hf, where)
    flat = arch.normalize(hf)
    arch.check(flat)
    fields: dict[str, Any] = dict(arch.fixed)
    for key in arch.config_keys:
        if flat.get(key.hf) is not None:
            value = flat[key.hf]
        elif key.default is REQUIRED:
            raise ConfigError(f"{where}: {CONFIG_FILE} has no {key.hf!r}")
        else:
            value = key.default(flat) if callable(key.default) else key.default
        fields[key.field] = value
    return arch, fields | arch.derive(flat)


def model_config_from_hf(hf: dict[str, Any], base: ModelConfig | None = None, where: str = "config.json"
                         ) -> ModelConfig:
    """A ModelConfig for a Hugging Face config: `base` (default: maxlm's defaults) with the mapped fields."""
    _, fields = model_fields_from_hf(hf, where)
    return dataclasses.replace(base or ModelConfig(), **fields)


def resolve_model_from_hf(cfg: Config, overrides: list[str] | None = None) -> Config:
    """`model.from_hf: DIR`: every model key that DIR/config.json determines (shape, RoPE and its scaling, norms,
    biases, QK-norm, window, MoE routing) is taken from it, replacing the YAML's; keys it does not determine
    (dtype, remat, scan_layers, attention kernel, capacity) stay the config's. A command-line override of a
    training-only key (balance coefficient, router jitter) wins; one of an architecture key that disagrees with
    config.json is an error. Returns `cfg` with the model section resolved and checked."""
    src = cfg.model.from_hf
    if not src:
        return cfg
    where = f"model.from_hf={src}"
    if not os.path.isfile(os.path.join(src, CONFIG_FILE)):
        raise ConfigError(f"{where}: no {CONFIG_FILE} there; give a Hugging Face model directory")
    arch, fields = model_fields_from_hf(read_hf_config(src), where)
    training_only = {k.field for k in arch.config_keys if k.training_only}
    explicit = parse_overrides(overrides or []).get("model", {})
    clashes = [f"model.{k}={getattr(cfg.model, k)!r} but config.json gives {v!r}" for k, v in fields.items()
               if k in explicit and k not in training_only and getattr(cfg.model, k) != v]
    if clashes:
        raise ConfigError(f"{where}: {'; '.join(clashes)} (drop the override: the model section comes from there)")
    keep = {k for k in fields if k in training_only and k in explicit}
    cfg.model = dataclasses.replace(cfg.model, **{k: v for k, v in fields.items() if k not in keep})
    check_static(cfg)
    return cfg
