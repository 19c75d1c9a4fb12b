"""The decoder: layers with a pluggable feed-forward block, scanned and rematerialised, then the LM head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxlm.config import ModelConfig
from maxlm.model.attention import Attention
from maxlm.model.ffn import FFN_BLOCKS
from maxlm.model.heads import logits_from_hidden
from maxlm.model.kv_cache import LayerKV
from maxlm.model.layers import Embed, RMSNorm, constrain, param
from maxlm.model.lora import DROPOUT_RNG, LoraSpec
from maxlm.model.remat import REMAT_POLICIES
from maxlm.model.stack import layer_groups, layer_kinds

class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)). Returns (x, the layer's updated KV cache or None)
    so it can be scanned (a cache is scanned over like the parameters)."""

    cfg: ModelConfig
    ffn: str = "mlp"
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, positions_BT: jax.Array,
                 cache: LayerKV | None = None) -> tuple[jax.Array, LayerKV | None]:
        c = self.cfg
        h_BTD = RMSNorm(c, name="attn_norm")(x_BTD)
        if cache is None:
            a_BTD = Attention(c, lora=self.lora, name="attn")(h_BTD, segment_ids_BT, positions_BT)
        else:
            a_BTD, cache = Attention(c, lora=self.lora, name="attn")(h_BTD, segment_ids_BT, positions_BT, cache)
        x_BTD = x_BTD + a_BTD
        h_BTD = RMSNorm(c, name="ffn_norm")(x_BTD)
        x_BTD = x_BTD + FFN_BLOCKS[self.ffn](c, lora=self.lora, name=self.ffn)(h_BTD)
        return constrain(x_BTD, ("act_batch", "act_length", "act_embed")), cache


class LayerBlock(nn.Module):
    """Consecutive layers with different feed-forward blocks (e.g. dense then MoE), scanned as one unit so that an
    interleaved stack is still a single scan. Sub-layer j is named `sub{j}`."""

    cfg: ModelConfig
    pattern: tuple[str, ...]
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, positions_BT: jax.Array,
                 cache: dict[str, LayerKV] | None = None) -> tuple[jax.Array, dict[str, LayerKV] | None]:
        new: dict[str, LayerKV] = {}
        for j, ffn in enumerate(self.pattern):
            name = f"sub{j}"
            x_BTD, new[name] = DecoderLayer(self.cfg, ffn, self.lora, name=name)(
                x_BTD, segment_ids_BT, positions_BT, None if cache is None else cache[name])
        return x_BTD, None if cache is None else new


class Decoder(nn.Module):
    """Llama-family decoder. Input ids and packing metadata -> float32 logits over the vocabulary, or with
    `hidden_only` the final-normed hidden states, so other heads (a scalar reward head, chunked log-probs through
    `maxlm.model.heads.lm_logits`) attach beside the LM head without touching the decoder. With a `lora` spec the
    selected projections carry adapters (maxlm.model.lora); embeddings, norms and the LM head never do.

    With `cache` (a tree of maxlm.model.kv_cache.LayerKV for every layer) the call is a decoding step: the tokens'
    keys/values are written at their positions and the result is (logits or hidden states, updated cache).
    """

    cfg: ModelConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, ids_BT: jax.Array, segment_ids_BT: jax.Array | None = None,
                 positions_BT: jax.Array | None = None, *, hidden_only: bool = False,
                 cache: Any = None) -> jax.Array | tuple[jax.Array, Any]:
        c = self.cfg
        B, T = ids_BT.shape
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        embed = Embed(c, name="embed")
        x_BTD = embed(ids_BT)
        new_cache: dict[str, Any] = {}

        def rematted(block: type[nn.Module]) -> type[nn.Module]:
            # prevent_cse only matters outside scan (scan already blocks CSE of the recomputation).
            if REMAT_POLICIES[c.remat] is None:
                return block
            return nn.remat(block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)

        if c.scan_layers:
            for g in layer_groups(c):
                # A one-layer pattern scans the DecoderLayer itself, so dense and all-MoE stacks keep the flat
                # `layers/{attn,mlp|moe,...}` parameter layout.
                single = len(g.pattern) == 1
                unit = rematted(DecoderLayer if single else LayerBlock)
                stack = nn.scan(unit, variable_axes={"params": 0, "aux": 0, "moe": 0},
                                split_rngs={"params": True, "router": True, DROPOUT_RNG: True},
                                in_axes=(nn.broadcast, nn.broadcast, 0), length=g.repeats,
                                metadata_params={nn.PARTITION_NAME: "layers"})
                x_BTD, new_cache[g.name] = stack(c, g.pattern[0] if single else g.pattern, self.lora, name=g.name)(
                    x_BTD, segment_ids_BT, positions_BT, None if cache is None else cache[g.name])
        else:
            for i, ffn in enumerate(layer_kinds(c)):
                name = f"layers_{i}"
                x_BTD, new_cache[name] = rematted(DecoderLayer)(c, ffn, self.lora, name=name)(
                    x_BTD, segment_ids_BT, positions_BT, None if cache is None else cache[name])

        x_BTD = RMSNorm(c, name="final_norm")(x_BTD)
        if hidden_only or c.head == "scalar":  # a reward model has no LM head (ScalarHead reads these states)
            out = x_BTD
        elif c.tie_embeddings:
            out = logits_from_hidden(c, x_BTD, embed.embedding)
        else:
            w_DV = param(self, "lm_head", nn.initializers.normal(c.init_std), (c.d_model, c.vocab_size),
                         ("embed", "vocab"), jnp.dtype(c.param_dtype))
            out = logits_from_hidden(c, x_BTD, w_DV)
        return out if cache is None else (out, new_cache)


def abstract_params(cfg: ModelConfig, seq_len: int = 8, lora: LoraSpec | None = None) -> Any:
    """Boxed (logically partitioned) parameter shapes, without allocating anything (with `lora`: adapters too)."""
    from maxlm.model.heads import init_head_params

    model = Decoder(cfg, lora=lora)
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda r, x: model.init(r, x)["params"] | init_head_params(cfg, r), jax.random.key(0), ids)


def count_params_eval_shape(cfg: ModelConfig) -> int:
    """Parameter count of the built model (tests compare it with the analytic `maxlm.flops.count_params`)."""
    leaves = jax.tree_util.tree_leaves(nn.unbox(abstract_params(cfg)))
    return sum(int(x.size) for x in leaves)
