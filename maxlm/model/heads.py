"""Heads on the decoder's final hidden states. The LM head is one of them: `Decoder(hidden_only=True)` returns the
states, and `lm_logits` turns them into logits outside the decoder (chunked log-probs, reward heads beside it)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from maxlm.config import ModelConfig
from maxlm.model.layers import constrain


def logits_from_hidden(cfg: ModelConfig, x_BTD: jax.Array, w: jax.Array) -> jax.Array:
    """float32 logits from hidden states and the head weight: the embedding table [V, D] when embeddings are tied,
    else `lm_head` [D, V]. The matmul runs in the hidden states' dtype and accumulates in float32."""
    eq = "btd,vd->btv" if cfg.tie_embeddings else "btd,dv->btv"
    logits_BTV = jnp.einsum(eq, x_BTD, w.astype(x_BTD.dtype), preferred_element_type=jnp.float32)
    return constrain(logits_BTV, ("act_batch", "act_length", "act_vocab"))


def lm_head_weight(cfg: ModelConfig, params: Any) -> jax.Array:
    """The LM head's weight in a decoder parameter tree ([V, D] tied, [D, V] untied)."""
    return params["embed"]["embedding"] if cfg.tie_embeddings else params["lm_head"]


def lm_logits(cfg: ModelConfig, params: Any, x_BTD: jax.Array) -> jax.Array:
    """The decoder's LM head applied to `Decoder(..., hidden_only=True)` output: equal to the decoder's logits."""
    return logits_from_hidden(cfg, x_BTD, lm_head_weight(cfg, params))
