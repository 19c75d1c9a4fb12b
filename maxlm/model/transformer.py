"""The decoder: layers with a pluggable feed-forward block, scanned and rematerialised, then the LM head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxlm.config import ModelConfig
from maxlm.model.attention import Attention
from maxlm.model.ffn import FFN_BLOCKS
from maxlm.model.layers import Embed, RMSNorm, compute_dtype, constrain, param

# What the backward pass may keep instead of recomputing (jax.checkpoint_policies).
REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer: least memory
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep every matmul output
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight-matmul outputs only
}


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)). Returns (x, None) so it can be scanned."""

    cfg: ModelConfig
    ffn: str = "mlp"

    @nn.compact
    def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, positions_BT: jax.Array
                 ) -> tuple[jax.Array, None]:
        c = self.cfg
        h_BTD = RMSNorm(c, name="attn_norm")(x_BTD)
        x_BTD = x_BTD + Attention(c, name="attn")(h_BTD, segment_ids_BT, positions_BT)
        h_BTD = RMSNorm(c, name="ffn_norm")(x_BTD)
        x_BTD = x_BTD + FFN_BLOCKS[self.ffn](c, name=self.ffn)(h_BTD)
        return constrain(x_BTD, ("act_batch", "act_length", "act_embed")), None


def layer_groups(cfg: ModelConfig) -> list[tuple[str, int]]:
    """Consecutive runs of identical layers as (ffn block, count); each run is one scan. Dense: one run."""
    return [(cfg.ffn, cfg.n_layers)]


class Decoder(nn.Module):
    """Llama-family decoder. Input ids and packing metadata -> float32 logits over the vocabulary."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, ids_BT: jax.Array, segment_ids_BT: jax.Array | None = None,
                 positions_BT: jax.Array | None = None) -> jax.Array:
        c = self.cfg
        B, T = ids_BT.shape
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        embed = Embed(c, name="embed")
        x_BTD = embed(ids_BT)

        first = 0
        for g, (ffn, count) in enumerate(layer_groups(c)):
            block = DecoderLayer
            if c.remat != "none":
                # prevent_cse only matters outside scan (scan already blocks CSE of the recomputation).
                block = nn.remat(block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
            if c.scan_layers:
                stack = nn.scan(block, variable_axes={"params": 0, "aux": 0}, split_rngs={"params": True},
                                in_axes=(nn.broadcast, nn.broadcast), length=count,
                                metadata_params={nn.PARTITION_NAME: "layers"})
                name = "layers" if g == 0 else f"layers_group{g}"
                x_BTD, _ = stack(c, ffn, name=name)(x_BTD, segment_ids_BT, positions_BT)
            else:
                for i in range(first, first + count):
                    x_BTD, _ = block(c, ffn, name=f"layers_{i}")(x_BTD, segment_ids_BT, positions_BT)
            first += count

        x_BTD = RMSNorm(c, name="final_norm")(x_BTD)
        if c.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            w_DV = param(self, "lm_head", nn.initializers.normal(c.init_std), (c.d_model, c.vocab_size),
                         ("embed", "vocab"), jnp.dtype(c.param_dtype))
            logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, w_DV.astype(compute_dtype(c)),
                                    preferred_element_type=jnp.float32)
        return constrain(logits_BTV, ("act_batch", "act_length", "act_vocab"))


def abstract_params(cfg: ModelConfig, seq_len: int = 8) -> Any:
    """Boxed (logically partitioned) parameter shapes, without allocating anything."""
    model = Decoder(cfg)
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda r, x: model.init(r, x), jax.random.key(0), ids)["params"]


def count_params_eval_shape(cfg: ModelConfig) -> int:
    """Parameter count of the built model (tests compare it with the analytic `maxlm.flops.count_params`)."""
    leaves = jax.tree_util.tree_leaves(nn.unbox(abstract_params(cfg)))
    return sum(int(x.size) for x in leaves)
