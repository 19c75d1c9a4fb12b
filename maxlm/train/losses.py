"""Losses as pure functions of (params, batch, rng, frozen) -> (loss, metrics), and the one call that runs the decoder.

The jitted step never knows which objective it runs (`maxlm.train.objectives` pairs each loss with its batch type).
Every loss is a mean over its own weighted units (tokens for next-token prediction, pairs for preferences) and
reports that unit count as `metrics["weight"]`, which the step uses to combine microbatches exactly: the global loss
is sum_i weight_i * loss_i / sum_i weight_i. `frozen` is the train state's tree that no optimizer touches (a
reference model, a LoRA base; None when the objective has none). Non-scalar statistics that a parameter hook reads
go in `metrics["stats"]` (weight-combined like the scalars, never logged).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxlm.config import Config, ModelConfig
from maxlm.model.lora import DROPOUT_RNG
from maxlm.model.moe import uses_router_bias
from maxlm.model.stack import layer_subtree
from maxlm.train.batch import LmBatch
from maxlm.treepath import path_parts

Batch = Any  # a batch dataclass of maxlm.train.batch (LmBatch, or an objective's own)
Metrics = dict[str, Any]
LossFn = Callable[[Any, Batch, jax.Array, Any], tuple[jax.Array, Metrics]]


def sum_aux_losses(aux: Any) -> jax.Array:
    """Adds every auxiliary loss sown by the model (e.g. MoE balancing), already scaled by its coefficient."""
    leaves = jax.tree_util.tree_leaves(aux)
    return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))


def weighted_token_ce(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array,
                      z_loss_coef: float = 0.0) -> tuple[jax.Array, Metrics]:
    """Mean next-token cross-entropy over weighted tokens, plus the PaLM z-loss coef * log(Z)^2 (Chowdhery et al.
    2022, sec. 5), which keeps the softmax normaliser near 1 for bf16 stability.

    `accuracy` is the weighted fraction of tokens whose target logit equals the row's max logit (ties count as
    correct, where an argmax would pick one of them). It reuses the max that log(Z) needs anyway, so on
    vocab-sharded logits it costs no collective of its own (an argmax all-gathers value/index pairs)."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    weights_BT = weights_BT.astype(jnp.float32)
    max_BT = jnp.max(logits_BTV, axis=-1)
    shift_BT = jax.lax.stop_gradient(max_BT)  # log-sum-exp as in jax.nn.logsumexp: exact gradient, no overflow
    log_z_BT = shift_BT + jnp.log(jnp.sum(jnp.exp(logits_BTV - shift_BT[..., None]), axis=-1))
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    ce_BT = log_z_BT - target_logit_BT
    total = jnp.sum(weights_BT)
    denom = jnp.maximum(total, 1.0)
    ce = jnp.sum(ce_BT * weights_BT) / denom
    z = jnp.sum(jnp.square(log_z_BT) * weights_BT) / denom
    correct = jnp.sum((target_logit_BT >= shift_BT) * weights_BT) / denom
    loss = ce + z_loss_coef * z
    return loss, {"ce": ce, "z_loss": z, "accuracy": correct, "weight": total}


def _sum_named(tree: Any, name: str) -> jax.Array:
    """Sum of the leaves sown under `name` anywhere in a collection (every layer's `load_balance`, say)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    hits = [x for path, x in flat if name in path_parts(path)]
    return sum_aux_losses(hits)


def moe_metrics(cfg: ModelConfig, aux: Any, moe: Any) -> Metrics:
    """Scalar MoE metrics from the sown `aux` and `moe` collections (empty for dense models).

    Totals: `moe_load_balance` and `moe_router_z` are the scaled terms added to the loss (coef x mean over MoE
    layers). Per MoE layer i, unscaled: `moe/layer{i}/load_balance`, `router_z`, `dropped` (fraction of
    assignments over capacity), `min_max_load` (least over most loaded expert's tokens: 1 is perfect balance) and,
    with `moe_expert_metrics` or DeepSeek-V3 bias balancing (which reads them), `load_e{j}`: the fraction of the
    step's token-expert assignments that went to expert j. All scalars, so microbatches average them like the loss.
    """
    if cfg.ffn != "moe" or not moe:
        return {}
    out: Metrics = {f"moe_{name}": _sum_named(aux, name) for name in ("load_balance", "router_z")}
    per_expert = cfg.moe_expert_metrics or uses_router_bias(cfg)
    for i in cfg.moe_layers:
        (stats,) = layer_subtree(cfg, moe, i)["moe"]["stats"]
        load_E = stats["load"]
        prefix = f"moe/layer{i}/"
        out |= {prefix + k: stats[k] for k in ("load_balance", "router_z", "dropped")}
        out[prefix + "min_max_load"] = jnp.min(load_E) / jnp.maximum(jnp.max(load_E), 1e-20)
        if per_expert:
            out |= {f"{prefix}load_e{e}": load_E[e] for e in range(cfg.num_experts)}
    return out


def moe_stats(cfg: ModelConfig, moe: Any) -> dict[str, jax.Array]:
    """What DeepSeek-V3 bias balancing reads (`maxlm.model.moe.router_bias_update`): `moe_load` [n_moe_layers, E],
    each MoE layer's per-expert token fractions. Empty unless the model balances with a router bias."""
    if not uses_router_bias(cfg) or not moe:
        return {}
    return {"moe_load": jnp.stack([layer_subtree(cfg, moe, i)["moe"]["stats"][0]["load"] for i in cfg.moe_layers])}


def apply_model(cfg: Config, model: nn.Module, params: Any, ids_BT: jax.Array, segment_ids_BT: jax.Array,
                positions_BT: jax.Array, rng: jax.Array, *, hidden_only: bool = False
                ) -> tuple[jax.Array, jax.Array, Metrics]:
    """The decoder on token rows: (logits, or final hidden states with `hidden_only`; the sum of its sown auxiliary
    losses; its MoE metrics, with `stats` for the bias update when it has any). `rng` drives router jitter (the only
    randomness in the decoder besides LoRA dropout); every objective built on the decoder shares this one call."""
    rngs = {"router": rng} if cfg.model.ffn == "moe" and cfg.model.router_jitter > 0 and rng is not None else {}
    if cfg.lora.enabled and cfg.lora.dropout > 0 and rng is not None:  # adapter dropout (maxlm.model.lora), training only
        rngs[DROPOUT_RNG] = jax.random.fold_in(rng, 1)
    out, state = model.apply({"params": params}, ids_BT, segment_ids_BT, positions_BT, hidden_only=hidden_only,
                             mutable=["aux", "moe"], rngs=rngs)
    aux, moe = state.get("aux", {}), state.get("moe", {})
    metrics = moe_metrics(cfg.model, aux, moe)
    stats = moe_stats(cfg.model, moe)
    if stats:
        metrics["stats"] = stats
    return out, sum_aux_losses(aux), metrics


def make_pretrain_loss(cfg: Config, model: nn.Module) -> LossFn:
    """Next-token prediction with per-token weights (`targets_weights`) on an `LmBatch`."""

    def loss_fn(params: Any, batch: LmBatch, rng: jax.Array, frozen: Any = None) -> tuple[jax.Array, Metrics]:
        logits_BTV, aux, extra = apply_model(cfg, model, params, batch.inputs, batch.inputs_segment_ids,
                                             batch.inputs_positions, rng)
        loss, metrics = weighted_token_ce(logits_BTV, batch.targets, batch.targets_weights, cfg.train.z_loss)
        return loss + aux, metrics | {"aux_loss": aux} | extra

    return loss_fn


def make_sft_loss(cfg: Config, model: nn.Module) -> LossFn:
    """Supervised fine-tuning (TRL's SFTTrainer, MaxText's use_sft) is next-token prediction on an `LmBatch` whose
    `targets_weights` are 1 only on the tokens the model must produce (maxlm.data.sft builds them): the same loss.
    Its mean is over every trained token of the global batch, because the step combines microbatches weighted by
    `metrics["weight"]` (transformers' `num_items_in_batch` semantics), not a mean of per-microbatch means."""
    return make_pretrain_loss(cfg, model)
