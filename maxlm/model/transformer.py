"""The decoder: layers with a pluggable feed-forward block, scanned and rematerialised, then the LM head."""

from __future__ import annotations

from dataclasses import dataclass
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


class LayerBlock(nn.Module):
    """Consecutive layers with different feed-forward blocks (e.g. dense then MoE), scanned as one unit so that an
    interleaved stack is still a single scan. Sub-layer j is named `sub{j}`."""

    cfg: ModelConfig
    pattern: tuple[str, ...]

    @nn.compact
    def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, positions_BT: jax.Array
                 ) -> tuple[jax.Array, None]:
        for j, ffn in enumerate(self.pattern):
            x_BTD, _ = DecoderLayer(self.cfg, ffn, name=f"sub{j}")(x_BTD, segment_ids_BT, positions_BT)
        return x_BTD, None


@dataclass(frozen=True)
class LayerGroup:
    """`repeats` copies of `pattern` (the ffn block of each layer in one unit), starting at layer `first`; the
    group's parameters live under `name` with a leading `layers` axis of size `repeats` when scanned."""

    name: str
    pattern: tuple[str, ...]
    repeats: int
    first: int

    @property
    def n_layers(self) -> int:
        return len(self.pattern) * self.repeats


def layer_kinds(cfg: ModelConfig) -> list[str]:
    """The feed-forward block of every layer (`ModelConfig.layer_is_moe` decides which layers are MoE)."""
    if cfg.ffn != "moe":
        return [cfg.ffn] * cfg.n_layers
    return ["moe" if cfg.layer_is_moe(i) else "mlp" for i in range(cfg.n_layers)]


def layer_groups(cfg: ModelConfig) -> list[LayerGroup]:
    """The stack as scans: dense models one group; MoE models the leading dense layers, then repeats of
    (interval - 1 dense, 1 MoE), then a trailing partial run of dense layers. Each group is one `nn.scan` (the first
    is named `layers`, as in a dense model, so an all-MoE stack such as Mixtral is `layers` too)."""
    runs: list[tuple[tuple[str, ...], int]] = []
    if cfg.ffn != "moe":
        runs.append(((cfg.ffn,), cfg.n_layers))
    else:
        fd, every = cfg.first_dense_layers, cfg.moe_layer_interval
        rest = cfg.n_layers - fd
        runs += [(("mlp",), fd), (("mlp",) * (every - 1) + ("moe",), rest // every), (("mlp",), rest % every)]
    groups, first = [], 0
    for pattern, repeats in runs:
        if repeats:
            groups.append(LayerGroup("layers" if not groups else f"layers_group{len(groups)}", pattern, repeats, first))
            first += len(pattern) * repeats
    assert [k for g in groups for _ in range(g.repeats) for k in g.pattern] == layer_kinds(cfg)
    return groups


def layer_path(cfg: ModelConfig, i: int) -> tuple[tuple[str, ...], int | None]:
    """Where layer i lives in the `params` (or any sown) collection: the key path of its DecoderLayer and, for a
    scanned stack, its index along the leading `layers` axis (None when layers are not scanned)."""
    if not cfg.scan_layers:
        return (f"layers_{i}",), None
    for g in layer_groups(cfg):
        if g.first <= i < g.first + g.n_layers:
            r, j = divmod(i - g.first, len(g.pattern))
            return ((g.name,) if len(g.pattern) == 1 else (g.name, f"sub{j}")), r
    raise IndexError(f"layer {i} of {cfg.n_layers}")


def layer_subtree(cfg: ModelConfig, tree: Any, i: int) -> Any:
    """Layer i's part of a collection (params, or sown statistics), with the scan axis indexed away."""
    path, r = layer_path(cfg, i)
    for k in path:
        tree = tree[k]
    return tree if r is None else jax.tree_util.tree_map(lambda x: x[r], tree)


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

        def rematted(block: type[nn.Module]) -> type[nn.Module]:
            # prevent_cse only matters outside scan (scan already blocks CSE of the recomputation).
            if c.remat == "none":
                return block
            return nn.remat(block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)

        if c.scan_layers:
            for g in layer_groups(c):
                # A one-layer pattern scans the DecoderLayer itself, so dense and all-MoE stacks keep the flat
                # `layers/{attn,mlp|moe,...}` parameter layout.
                single = len(g.pattern) == 1
                unit = rematted(DecoderLayer if single else LayerBlock)
                stack = nn.scan(unit, variable_axes={"params": 0, "aux": 0, "moe": 0},
                                split_rngs={"params": True, "router": True}, in_axes=(nn.broadcast, nn.broadcast),
                                length=g.repeats, metadata_params={nn.PARTITION_NAME: "layers"})
                x_BTD, _ = stack(c, g.pattern[0] if single else g.pattern, name=g.name)(
                    x_BTD, segment_ids_BT, positions_BT)
        else:
            for i, ffn in enumerate(layer_kinds(c)):
                x_BTD, _ = rematted(DecoderLayer)(c, ffn, name=f"layers_{i}")(x_BTD, segment_ids_BT, positions_BT)

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
