"""Heads on the decoder's final hidden states. The LM head is one of them: `Decoder(hidden_only=True)` returns the
states, and `lm_logits` turns them into logits outside the decoder (chunked log-probs, reward heads beside it).

`ScalarHead` is the reward model's head (model.head=scalar): one linear map D -> 1, read at each sequence's last
token, as Hugging Face's `LlamaForSequenceClassification` (`score`, no bias, num_labels=1) reads its pooled last
non-pad token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxlm.config import ModelConfig
from maxlm.model.layers import constrain, param


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


SCORE = "score"  # the reward head's name in the params tree (Hugging Face's `score.weight`)


class ScalarHead(nn.Module):
    """x [..., D] -> one float32 score per position [...]. Initialised like HF's `score` (normal, init_std)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_ND: jax.Array) -> jax.Array:
        c = self.cfg
        w_D1 = param(self, "kernel", nn.initializers.normal(c.init_std), (c.d_model, 1), ("embed", None),
                     jnp.dtype(c.param_dtype))
        return jnp.einsum("...d,do->...o", x_ND.astype(jnp.float32), w_D1.astype(jnp.float32))[..., 0]


def init_head_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Parameters of the heads beside the decoder's own: `{score: ...}` for model.head=scalar, else none. Its key
    is folded from `rng`, so the decoder's initialisation is the same with or without it."""
    if cfg.head != "scalar":
        return {}
    x = jnp.zeros((1, cfg.d_model), jnp.float32)
    return {SCORE: ScalarHead(cfg).init(jax.random.fold_in(rng, 0x5C0E), x)["params"]}


def segment_last_index(segment_ids_NL: jax.Array, n_segments: int) -> jax.Array:
    """Flat position of the last token of segments 1..n_segments in each row [N, n_segments] (-1 where a segment is
    absent). A packed row holds several sequences; each is scored at its own last token."""
    L = segment_ids_NL.shape[-1]
    pos_L = jnp.arange(L, dtype=jnp.int32)
    ids_S = jnp.arange(1, n_segments + 1, dtype=segment_ids_NL.dtype)
    hit_NLS = segment_ids_NL[..., None] == ids_S
    return jnp.max(jnp.where(hit_NLS, pos_L[:, None], -1), axis=-2)


def gather_last(x_NLD: jax.Array, last_NS: jax.Array) -> jax.Array:
    """Hidden states at the given flat positions [N, S, D] (an absent segment, index -1, reads position 0)."""
    idx_NS = jnp.maximum(last_NS, 0)
    return jnp.take_along_axis(x_NLD, idx_NS[..., None], axis=1)
