"""`train.objective: dpo`: preference optimisation on the one train step.

Per group of whole pairs (maxlm.data.preference), the policy's summed response log-probs come from one decoder
pass (maxlm.train.pair_logps), the reference's from `maxlm.train.reference`, and `preference_loss` turns them into
per-pair losses and rewards. Every quantity is a mean over real pairs and `metrics["weight"]` is the pair count, so
gradient accumulation combines microbatches per pair, exactly. Metric names are TRL's.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxlm.config import Config
from maxlm.config.preference_checks import loss_types, loss_weights
from maxlm.train.pair_logps import pair_logps
from maxlm.train.preference import mixed_preference_loss
from maxlm.train.reference import reference_logps

Metrics = dict[str, jax.Array]


def pair_mean(x_NK: jax.Array, mask_NK: jax.Array) -> jax.Array:
    return jnp.sum(x_NK * mask_NK) / jnp.maximum(jnp.sum(mask_NK), 1.0)


def make_dpo_loss(cfg: Config, model: nn.Module) -> Callable[..., tuple[jax.Array, Metrics]]:
    p = cfg.dpo
    types, weights = loss_types(cfg), loss_weights(cfg)

    def loss_fn(params: Any, batch: Any, rng: jax.Array, frozen: Any = None) -> tuple[jax.Array, Metrics]:
        rc, rr = reference_logps(cfg, model, batch, frozen)
        # The reference pass finishes before the policy pass starts. Two independent forward passes let XLA:CPU's
        # concurrent thunk executor issue their collectives in different orders on different devices, which
        # deadlocked its in-process rendezvous (LoRA with dpo.reference=base on a 2x2x2 mesh); the barrier orders
        # them and changes no value.
        rc, rr, params = jax.lax.optimization_barrier((rc, rr, params))
        (pc, pr, lc, lr), aux, extra = pair_logps(cfg, model, params, batch, rng)
        losses, reward_c, reward_r = mixed_preference_loss(
            pc, pr, rc, rr, loss_types=types, loss_weights=weights, beta=p.beta, label_smoothing=p.label_smoothing,
            chosen_lengths=lc, rejected_lengths=lr, simpo_gamma=p.simpo_gamma)
        mask = batch.pair_mask.astype(jnp.float32)
        nll_c = -pc / jnp.maximum(lc, 1.0)  # the chosen responses' per-token NLL
        if p.sft_weight:
            losses = losses + p.sft_weight * nll_c
        pref = pair_mean(losses, mask)
        metrics = {"preference_loss": pref, "rewards/chosen": pair_mean(reward_c, mask),
                   "rewards/rejected": pair_mean(reward_r, mask),
                   "rewards/accuracies": pair_mean((reward_c > reward_r).astype(jnp.float32), mask),
                   "rewards/margins": pair_mean(reward_c - reward_r, mask),
                   "logps/chosen": pair_mean(pc, mask), "logps/rejected": pair_mean(pr, mask),
                   "nll/chosen": pair_mean(nll_c, mask), "aux_loss": aux, "weight": jnp.sum(mask)}
        return pref + aux, metrics | extra

    return loss_fn
