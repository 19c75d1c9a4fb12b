"""Per-response log-probabilities of a preference batch: one decoder pass over every row, summed per segment.

A preference batch holds groups [N, S, T] (see maxlm.data.preference): S rows per group (1 packed, 2 padded) whose
segment 2k+1 is pair k's chosen sequence and 2k+2 its rejected one. The decoder runs on the N*S rows at once (the
chosen and rejected sequences of a pair in the same pass, as TRL's concatenated forward), and a response's
log-probability is the sum of log pi(target) over its weighted (response) positions, per segment.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxlm.config import Config

ROW_FIELDS = ("inputs", "targets", "inputs_segment_ids", "inputs_positions", "targets_weights")


def rows(batch: Any) -> dict[str, jax.Array]:
    """The group-major fields [N, S, T] as decoder rows [N*S, T]."""
    out = {}
    for name in ROW_FIELDS:
        x = getattr(batch, name)
        out[name] = x.reshape((-1, x.shape[-1]))
    return out


def per_group(x_RT: jax.Array, n_groups: int) -> jax.Array:
    """Rows [N*S, T, ...] back to one flat sequence per group [N, S*T, ...]."""
    return x_RT.reshape((n_groups, -1) + x_RT.shape[2:])


def token_logps(logits_RTV: jax.Array, targets_RT: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position, in float32 [R, T]."""
    logits_RTV = logits_RTV.astype(jnp.float32)
    target_logit_RT = jnp.take_along_axis(logits_RTV, targets_RT[..., None], axis=-1)[..., 0]
    return target_logit_RT - jax.nn.logsumexp(logits_RTV, axis=-1)


def segment_sums(x_NL: jax.Array, segment_ids_NL: jax.Array, n_segments: int) -> jax.Array:
    """sum of x over the positions of segments 1..n_segments, per group [N, n_segments] (segment 0 = padding)."""
    onehot_NLS = jax.nn.one_hot(segment_ids_NL - 1, n_segments, dtype=jnp.float32)
    return jnp.einsum("nl,nls->ns", x_NL.astype(jnp.float32), onehot_NLS)


def split_pairs(per_segment_NS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[N, 2K] per segment -> (chosen [N, K], rejected [N, K])."""
    return per_segment_NS[:, 0::2], per_segment_NS[:, 1::2]


def pair_logps(cfg: Config, model: nn.Module, params: Any, batch: Any, rng: jax.Array | None
               ) -> tuple[tuple[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array, dict[str, jax.Array]]:
    """((chosen_logps, rejected_logps, chosen_lengths, rejected_lengths) each [N, K], aux loss, MoE metrics) of
    `params` on a preference batch. `rng` None runs without router jitter (the reference model)."""
    from maxlm.train.losses import apply_model

    n_groups, k = batch.pair_mask.shape
    r = rows(batch)
    logits_RTV, aux, extra = apply_model(cfg, model, params, r["inputs"], r["inputs_segment_ids"],
                                         r["inputs_positions"], rng)
    weights_RT = r["targets_weights"].astype(jnp.float32)
    lp_NL = per_group(token_logps(logits_RTV, r["targets"]) * weights_RT, n_groups)
    seg_NL = per_group(r["inputs_segment_ids"], n_groups)
    logps_c, logps_r = split_pairs(segment_sums(lp_NL, seg_NL, 2 * k))
    len_c, len_r = split_pairs(segment_sums(per_group(weights_RT, n_groups), seg_NL, 2 * k))
    return (logps_c, logps_r, len_c, len_r), aux, extra
