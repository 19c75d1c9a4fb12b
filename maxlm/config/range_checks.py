"""Values the math needs in range (called by `check_static`): every number finite, Adam's betas in [0, 1), positive
epsilons and counts, non-negative coefficients. The data section's fractions are checked in data_spec."""

from __future__ import annotations

import dataclasses
import math

from maxlm.config.schema import Config, ConfigError


def check_ranges(cfg: Config) -> None:
    """Values the math needs in range: every number finite, Adam's betas in [0, 1) (beta = 1 never forgets and
    its bias correction divides by 1 - beta^t = 0), eps > 0 (a zero gradient would give 0/0), counts positive,
    coefficients non-negative."""
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        for f in dataclasses.fields(value) if dataclasses.is_dataclass(value) else []:
            v = getattr(value, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{section.name}.{f.name}={v} must be a finite number")
    o, t, m = cfg.optim, cfg.train, cfg.model
    for key, val in [("optim.b1", o.b1), ("optim.b2", o.b2)]:
        if not 0.0 <= val < 1.0:
            raise ConfigError(f"{key}={val} must be in [0, 1) (Adam's moment decay; e.g. 0.9 and 0.95)")
    for key, val in [("optim.eps", o.eps), ("model.norm_eps", m.norm_eps), ("model.rope_theta", m.rope_theta),
                     ("model.init_std", m.init_std)]:
        if not val > 0:
            raise ConfigError(f"{key}={val} must be positive")
    for key, val in [("optim.weight_decay", o.weight_decay), ("train.z_loss", t.z_loss),
                     ("train.eval_every", t.eval_every), ("model.head_dim", m.head_dim)]:
        if val < 0:
            raise ConfigError(f"{key}={val} must be >= 0")
    for key, val in [("train.max_nonfinite_steps", t.max_nonfinite_steps), ("train.eval_steps", t.eval_steps)]:
        if val < 1:
            raise ConfigError(f"{key}={val} must be >= 1" + (
                " (the number of consecutive NaN/Inf steps skipped before the run stops)"
                if key == "train.max_nonfinite_steps" else ""))
