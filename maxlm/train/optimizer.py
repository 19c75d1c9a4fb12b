"""AdamW, learning-rate schedules, clipping and the weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from maxlm.config import Config, OptimConfig
from maxlm.treepath import key_name


def lr_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine to min_lr, WSD (warmup-stable-decay, Hu et al. 2024 MiniCPM: constant, then a
    linear decay over the last `decay_fraction` of steps) or constant."""
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    rest = max(total_steps - warmup, 1)
    floor = o.lr * o.min_lr_ratio
    # Step s of warmup uses lr * (s + 1) / warmup: the first step already learns, the last reaches the peak.
    warm = optax.linear_schedule(o.lr / max(warmup, 1), o.lr, max(warmup - 1, 1))
    if o.schedule == "cosine":
        main = optax.cosine_decay_schedule(o.lr, rest, alpha=o.min_lr_ratio)
    elif o.schedule == "wsd":
        decay = max(int(round(rest * o.decay_fraction)), 1)
        main = optax.join_schedules([optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, floor, decay)],
                                    [rest - decay])
    else:
        main = optax.constant_schedule(o.lr)
    return optax.join_schedules([warm, main], [warmup]) if warmup else main


def decay_mask(o: OptimConfig, params: Any) -> Any:
    """True where weight decay applies: every leaf whose name is not listed in `optim.no_decay` (norms and
    embeddings by default, following common LLM practice)."""

    def keep(path: tuple, _: Any) -> bool:
        name = key_name(path[-1])
        return str(name) not in o.no_decay

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optim
    schedule = lr_schedule(o, cfg.train.steps)
    parts = []
    if o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=lambda p: decay_mask(o, p)))
    return optax.chain(*parts), schedule
