"""`train.objective: reward`: a Bradley-Terry reward model on the decoder's final hidden states.

The score of a sequence is `ScalarHead` (maxlm.model.heads, params under `score`) at its last token; packed rows
hold several sequences and each is scored at its own last token. Per pair (TRL reward_trainer.py):
    loss = -log sigmoid(r_c - r_r - margin) + reward.center_rewards_coef * (r_c + r_r)^2
Metrics: `accuracy` (r_c > r_r) and `margin` (r_c - r_r), means over real pairs; `weight` is the pair count.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxlm.config import Config
from maxlm.model.heads import SCORE, ScalarHead, gather_last, segment_last_index
from maxlm.train.dpo import pair_mean
from maxlm.train.pair_logps import per_group, rows, split_pairs
from maxlm.train.preference import bradley_terry_loss

Metrics = dict[str, jax.Array]


def sequence_scores(cfg: Config, model: nn.Module, params: Any, batch: Any, rng: jax.Array | None
                    ) -> tuple[jax.Array, jax.Array, Metrics]:
    """(scores [N, 2K] of segments 1..2K at their last tokens, aux loss, MoE metrics)."""
    from maxlm.train.losses import apply_model

    n_groups, k = batch.pair_mask.shape
    r = rows(batch)
    x_RTD, aux, extra = apply_model(cfg, model, params, r["inputs"], r["inputs_segment_ids"], r["inputs_positions"],
                                    rng, hidden_only=True)
    x_NLD = per_group(x_RTD, n_groups)
    last_NS = segment_last_index(per_group(r["inputs_segment_ids"], n_groups), 2 * k)
    scores_NS = ScalarHead(cfg.model).apply({"params": params[SCORE]}, gather_last(x_NLD, last_NS))
    return scores_NS, aux, extra


def make_reward_loss(cfg: Config, model: nn.Module) -> Callable[..., tuple[jax.Array, Metrics]]:
    coef = cfg.reward.center_rewards_coef

    def loss_fn(params: Any, batch: Any, rng: jax.Array, frozen: Any = None) -> tuple[jax.Array, Metrics]:
        scores_NS, aux, extra = sequence_scores(cfg, model, params, batch, rng)
        sc, sr = split_pairs(scores_NS)
        mask = batch.pair_mask.astype(jnp.float32)
        bt = pair_mean(bradley_terry_loss(sc, sr, batch.margin, coef), mask)
        metrics = {"reward_loss": bt, "accuracy": pair_mean((sc > sr).astype(jnp.float32), mask),
                   "margin": pair_mean(sc - sr, mask), "rewards/chosen": pair_mean(sc, mask),
                   "rewards/rejected": pair_mean(sr, mask), "aux_loss": aux, "weight": jnp.sum(mask)}
        return bt + aux, metrics | extra

    return loss_fn
