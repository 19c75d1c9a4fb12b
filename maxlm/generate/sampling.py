"""Choosing the next token: greedy, or sampling after temperature, top-k, top-p and min-p, per row.

The warpers run in transformers' order (transformers/generation/utils.py `_get_logits_processor`: temperature,
then top-k, then top-p, then min-p) with the semantics of transformers/generation/logits_process.py:
  * temperature: logits / T;
  * top-k: drop every logit below the k-th largest (ties with it stay);
  * top-p (Holtzman et al. 2020): sort ascending, drop the tokens whose cumulative probability is <= 1 - p (the
    most likely token always stays);
  * min-p (Nguyen et al. 2024): drop the tokens whose probability is below min_p x the top token's (after the
    temperature, as transformers and llama.cpp apply it).
Every row carries its own settings and seed; a row's random stream is fold_in(key(seed), index of the token in
its completion), so a request samples the same tokens whatever batch it shares and wherever it sits in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings. temperature 0 is greedy (argmax); top_k 0, top_p 1 and min_p 0 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class Warpers:
    """Which warpers any row of a batch uses: a static part of the compiled step (a greedy-only batch never sorts
    the vocabulary)."""

    sample: bool
    top_k: bool
    top_p: bool
    min_p: bool

    @staticmethod
    def of(params: list[SamplingParams]) -> "Warpers":
        s = [p for p in params if not p.greedy]
        return Warpers(bool(s), any(p.top_k > 0 for p in s), any(p.top_p < 1 for p in s),
                       any(p.min_p > 0 for p in s))


@flax.struct.dataclass
class RowSampling:
    """Per-row settings as device arrays, [B] each."""

    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    min_p_B: jax.Array
    seed_B: jax.Array

    @staticmethod
    def of(params: list[SamplingParams]) -> "RowSampling":
        return RowSampling(np.asarray([p.temperature for p in params], np.float32),
                           np.asarray([p.top_k for p in params], np.int32),
                           np.asarray([p.top_p for p in params], np.float32),
                           np.asarray([p.min_p for p in params], np.float32),
                           np.asarray([p.seed for p in params], np.uint32))


def warp(logits_BV: jax.Array, rows: RowSampling, which: Warpers) -> jax.Array:
    """Float32 logits after temperature, top-k, top-p and min-p (removed tokens are -inf)."""
    neg_inf = jnp.array(-jnp.inf, jnp.float32)
    x_BV = logits_BV.astype(jnp.float32)
    temp_B = jnp.where(rows.temperature_B > 0, rows.temperature_B, 1.0)
    x_BV = x_BV / temp_B[:, None]
    V = x_BV.shape[-1]
    if which.top_k:
        desc_BV = -jnp.sort(-x_BV, axis=-1)
        k_B = jnp.clip(rows.top_k_B, 1, V)
        kth_B1 = jnp.take_along_axis(desc_BV, (k_B - 1)[:, None], axis=-1)
        x_BV = jnp.where((rows.top_k_B > 0)[:, None] & (x_BV < kth_B1), neg_inf, x_BV)
    if which.top_p:
        order_BV = jnp.argsort(x_BV, axis=-1)  # ascending
        asc_BV = jnp.take_along_axis(x_BV, order_BV, axis=-1)
        cum_BV = jnp.cumsum(jax.nn.softmax(asc_BV, axis=-1), axis=-1)
        drop_sorted_BV = (cum_BV <= (1.0 - rows.top_p_B)[:, None]).at[:, -1].set(False)
        drop_BV = jnp.zeros_like(drop_sorted_BV).at[jnp.arange(x_BV.shape[0])[:, None], order_BV].set(drop_sorted_BV)
        x_BV = jnp.where((rows.top_p_B < 1)[:, None] & drop_BV, neg_inf, x_BV)
    if which.min_p:
        probs_BV = jax.nn.softmax(x_BV, axis=-1)
        top_B1 = jnp.max(probs_BV, axis=-1, keepdims=True)
        drop_BV = probs_BV < rows.min_p_B[:, None] * top_B1
        drop_BV = drop_BV & (jnp.arange(V)[None, :] != jnp.argmax(probs_BV, axis=-1)[:, None])
        x_BV = jnp.where((rows.min_p_B > 0)[:, None] & drop_BV, neg_inf, x_BV)
    return x_BV


def next_tokens(logits_BV: jax.Array, rows: RowSampling, which: Warpers, index_B: jax.Array) -> jax.Array:
    """The next token of every row: argmax for greedy rows, else a draw from the warped distribution with the row's
    key for this completion index. int32 [B]."""
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if not which.sample:
        return greedy_B
    warped_BV = warp(logits_BV, rows, which)

    def draw(seed: jax.Array, index: jax.Array, x_V: jax.Array) -> jax.Array:
        return jax.random.categorical(jax.random.fold_in(jax.random.key(seed), index), x_V)

    sampled_B = jax.vmap(draw)(rows.seed_B, index_B, warped_BV).astype(jnp.int32)
    return jnp.where(rows.temperature_B > 0, sampled_B, greedy_B)
