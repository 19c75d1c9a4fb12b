"""Checks of the preference keys (`dpo.*`, `reward.*`, `data.example_format: preference`), called by check_static.

Imports nothing outside the config, so every mistake is one line and exit code 2 before anything compiles.
"""

from __future__ import annotations

import math
import os

from maxlm.config.schema import PREFERENCE_LOSS_NAMES, REFERENCE_FREE_NAMES, REFERENCE_MODES, Config, ConfigError

PREFERENCE_OBJECTIVES = ("dpo", "reward")


def loss_types(cfg: Config) -> tuple[str, ...]:
    """`dpo.loss_type` as a tuple of names (one name or a list)."""
    lt = cfg.dpo.loss_type
    return tuple(lt) if isinstance(lt, list) else (lt,)


def loss_weights(cfg: Config) -> tuple[float, ...]:
    return tuple(float(w) for w in cfg.dpo.loss_weights) or (1.0,) * len(loss_types(cfg))


def check_preference(cfg: Config) -> None:
    d, p, t = cfg.data, cfg.dpo, cfg.train
    if d.example_format == "preference":
        for key, val in [("data.chosen_field", d.chosen_field), ("data.rejected_field", d.rejected_field)]:
            if not val:
                raise ConfigError(f"{key} is empty; name the JSONL field that holds the response")
        if d.chosen_field == d.rejected_field:
            raise ConfigError(f"data.chosen_field and data.rejected_field are both {d.chosen_field!r}")
        if d.pairs_per_row < 1:
            raise ConfigError(f"data.pairs_per_row must be >= 1, got {d.pairs_per_row}")
        if d.mixture:
            raise ConfigError("data.example_format=preference reads one source (data.path); data.mixture is for "
                              "pretraining text")
    if t.objective in PREFERENCE_OBJECTIVES and d.example_format != "preference" and d.source != "synthetic":
        raise ConfigError(f"train.objective={t.objective} trains on pairs: set data.example_format=preference")
    if not isinstance(p.loss_type, (str, list)) or not loss_types(cfg):
        raise ConfigError(f"dpo.loss_type must be a name or a list of names, got {p.loss_type!r}")
    for name in loss_types(cfg):
        if name not in PREFERENCE_LOSS_NAMES:
            raise ConfigError(f"dpo.loss_type={name!r} is not one of {', '.join(PREFERENCE_LOSS_NAMES)}")
    if p.loss_weights:
        if len(p.loss_weights) != len(loss_types(cfg)):
            raise ConfigError(f"dpo.loss_weights has {len(p.loss_weights)} entries but dpo.loss_type has "
                              f"{len(loss_types(cfg))}; give one weight per loss type")
        if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in p.loss_weights):
            raise ConfigError(f"dpo.loss_weights must be finite numbers >= 0, got {p.loss_weights}")
    if not (p.beta > 0 and math.isfinite(p.beta)):
        raise ConfigError(f"dpo.beta must be > 0, got {p.beta}")
    if not 0 <= p.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {p.label_smoothing}")
    if p.sft_weight < 0:
        raise ConfigError(f"dpo.sft_weight must be >= 0, got {p.sft_weight}")
    if p.reference not in REFERENCE_MODES:
        raise ConfigError(f"dpo.reference={p.reference!r} is not one of {', '.join(REFERENCE_MODES)}")
    free = all(n in REFERENCE_FREE_NAMES for n in loss_types(cfg))
    if t.objective == "dpo":
        if p.reference == "none" and not free:
            needs = [n for n in loss_types(cfg) if n not in REFERENCE_FREE_NAMES]
            raise ConfigError(f"dpo.reference=none but dpo.loss_type {needs[0]!r} needs a reference model; use "
                              f"dpo.reference=frozen or precomputed (only {', '.join(REFERENCE_FREE_NAMES)} are "
                              "reference-free)")
        if p.reference != "none" and free:
            raise ConfigError(f"dpo.loss_type {'/'.join(loss_types(cfg))} uses no reference model; set "
                              "dpo.reference=none")
    if p.reference_from:
        if p.reference == "none":
            raise ConfigError("dpo.reference_from is set but dpo.reference=none; drop one of them")
        if "://" not in p.reference_from and not os.path.exists(os.path.expanduser(p.reference_from)):
            raise ConfigError(f"dpo.reference_from: {p.reference_from} does not exist; give a maxlm checkpoint or a "
                              "Hugging Face model directory")
    if (t.objective == "reward") != (cfg.model.head == "scalar"):
        fix = "model.head=scalar" if t.objective == "reward" else "model.head=lm"
        raise ConfigError(f"train.objective={t.objective} with model.head={cfg.model.head}: set {fix} (reward models "
                          "have the scalar head, every other objective the LM head)")
    if p.reference == "base":
        if not cfg.lora.enabled:
            raise ConfigError("dpo.reference=base is the LoRA base model without its adapters: set lora.enabled=true, "
                              "or use dpo.reference=frozen or precomputed")
        if p.reference_from:
            raise ConfigError("dpo.reference=base uses the LoRA base (load_parameters_from) as the reference: unset "
                              "dpo.reference_from, or use dpo.reference=frozen to load another reference")
    if d.example_format == "preference" and d.cache_dir:
        raise ConfigError("data.cache_dir holds pretraining documents; preference pairs are read from data.path and "
                          "cached in run_dir/preference (unset data.cache_dir)")
    if cfg.reward.center_rewards_coef < 0:
        raise ConfigError(f"reward.center_rewards_coef must be >= 0, got {cfg.reward.center_rewards_coef}")
