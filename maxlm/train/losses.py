"""Objectives as pure functions of (params, batch, rng) -> (loss, metrics).

The jitted step never knows which objective it runs. Every loss is a mean over its own weighted units (tokens
for next-token prediction) and reports that unit count as `metrics["weight"]`, which the step uses to combine
microbatches exactly: the global loss is sum_i weight_i * loss_i / sum_i weight_i.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from maxlm.config import Config

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, Metrics]]


def sum_aux_losses(aux: Any) -> jax.Array:
    """Adds every auxiliary loss sown by the model (e.g. MoE balancing), already scaled by its coefficient."""
    leaves = jax.tree_util.tree_leaves(aux)
    return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))


def weighted_token_ce(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array,
                      z_loss_coef: float = 0.0) -> tuple[jax.Array, Metrics]:
    """Mean next-token cross-entropy over weighted tokens, plus the PaLM z-loss coef * log(Z)^2 (Chowdhery et al.
    2022, sec. 5), which keeps the softmax normaliser near 1 for bf16 stability."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    weights_BT = weights_BT.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    ce_BT = log_z_BT - target_logit_BT
    total = jnp.sum(weights_BT)
    denom = jnp.maximum(total, 1.0)
    ce = jnp.sum(ce_BT * weights_BT) / denom
    z = jnp.sum(jnp.square(log_z_BT) * weights_BT) / denom
    correct = jnp.sum((jnp.argmax(logits_BTV, -1) == targets_BT) * weights_BT) / denom
    loss = ce + z_loss_coef * z
    return loss, {"ce": ce, "z_loss": z, "accuracy": correct, "weight": total}


def make_pretrain_loss(cfg: Config, model: nn.Module) -> LossFn:
    """Next-token prediction with per-token weights (`targets_weights`); SFT reuses it with prompts weighted 0."""

    def loss_fn(params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng  # no dropout in the decoder
        logits_BTV, state = model.apply({"params": params}, batch["inputs"], batch["inputs_segment_ids"],
                                        batch["inputs_positions"], mutable=["aux"])
        loss, metrics = weighted_token_ce(logits_BTV, batch["targets"], batch["targets_weights"], cfg.train.z_loss)
        aux = sum_aux_losses(state.get("aux", {}))
        return loss + aux, metrics | {"aux_loss": aux}

    return loss_fn


OBJECTIVES: dict[str, Callable[[Config, nn.Module], LossFn]] = {"pretrain": make_pretrain_loss}
