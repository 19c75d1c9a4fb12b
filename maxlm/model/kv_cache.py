"""The key/value cache for decoding: per-layer K/V buffers, their logical axes, and the write + mask rule.

Layout: one `LayerKV(k, v)` per attention layer, each [B, S, K, H] (rows, cache slots, KV heads, head dim).
The tree mirrors the decoder's parameter tree (maxlm.model.stack.layer_groups): a scanned group holds its
layers stacked on a leading `layers` axis, exactly like its parameters, so `nn.scan` slices one layer's buffers per
iteration; unscanned layers are `layers_{i}`. Rows are split over the data-parallel axes (`act_batch`) and KV heads
over `tensor` (`act_kv_heads`), through the same rules table as training.

Slot = position. A row's token at position p is written to slot p, and a query at position p sees exactly the
slots 0..p. Prompts of different lengths are right-padded: padding writes garbage into slots >= the prompt's
length, but each decode step writes slot p before any query can see it, so no padded slot is ever attended to.
Positions therefore run 0, 1, 2, ... per row as in training (a document starts at position 0), and the mask is
training's causal mask over one document, so cached decoding computes the same function as a full forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from maxlm.config import ModelConfig
from maxlm.model.stack import layer_groups

# Logical names of a K/V buffer's dimensions; a scanned stack prepends "layers".
KV_AXES: tuple[str | None, ...] = ("act_batch", "act_length", "act_kv_heads", None)


@flax.struct.dataclass
class LayerKV:
    """One attention layer's cache: k and v, each [B, S, K, H] ([L, B, S, K, H] for a scanned stack)."""

    k: jax.Array
    v: jax.Array


def cache_tree(cfg: ModelConfig, leaf: Callable[[], Any], stacked: Callable[[int], Any]) -> Any:
    """The cache's tree of LayerKV, matching the decoder's layer structure (maxlm.model.stack.layer_groups).
    `leaf()` makes one buffer of an unscanned layer; `stacked(repeats)` one of a scanned group (leading axis of
    size `repeats`)."""
    if not cfg.scan_layers:
        return {f"layers_{i}": LayerKV(leaf(), leaf()) for i in range(cfg.n_layers)}
    tree: dict[str, Any] = {}
    for g in layer_groups(cfg):
        if len(g.pattern) == 1:
            tree[g.name] = LayerKV(stacked(g.repeats), stacked(g.repeats))
        else:
            tree[g.name] = {f"sub{j}": LayerKV(stacked(g.repeats), stacked(g.repeats)) for j in range(len(g.pattern))}
    return tree


def cache_shapes(cfg: ModelConfig, batch: int, length: int, dtype: jnp.dtype) -> Any:
    """ShapeDtypeStructs of a cache for `batch` rows and `length` slots."""
    shape = (batch, length, cfg.n_kv_heads, cfg.head_dim_resolved)
    return cache_tree(cfg, lambda: jax.ShapeDtypeStruct(shape, dtype),
                      lambda r: jax.ShapeDtypeStruct((r,) + shape, dtype))


def cache_logical_axes(cfg: ModelConfig) -> Any:
    """Logical axis names of every buffer (a PartitionSpec-like tuple per leaf), for `nn.logical_to_mesh_sharding`."""
    spec = jax.sharding.PartitionSpec(*KV_AXES)
    stacked = jax.sharding.PartitionSpec("layers", *KV_AXES)
    return cache_tree(cfg, lambda: spec, lambda r: stacked)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: jnp.dtype) -> Any:
    """A zero cache (call inside jit with out_shardings so each device allocates only its shard)."""
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(cfg, batch, length, dtype))


def write(kv: LayerKV, k_BTKH: jax.Array, v_BTKH: jax.Array, positions_BT: jax.Array) -> LayerKV:
    """Writes T new keys/values of each row at slots positions[b, 0] .. positions[b, 0] + T - 1 (a row's positions
    in one call are consecutive: a prefill from 0, or one decode token). A batched dynamic_update_slice: XLA updates
    the donated buffer in place."""
    start_B = positions_BT[:, 0]

    def put(buf_SKH: jax.Array, new_TKH: jax.Array, s: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(buf_SKH, new_TKH.astype(buf_SKH.dtype), (s, 0, 0))

    return LayerKV(jax.vmap(put)(kv.k, k_BTKH, start_B), jax.vmap(put)(kv.v, v_BTKH, start_B))


def visible_B1TS(positions_BT: jax.Array, length: int, sliding_window: int = 0) -> jax.Array:
    """Which cache slots each query sees: slot s <= the query's position (training's causal mask over one
    document, in slot coordinates) and, with a sliding window w > 0, s > position - w (as
    maxlm.model.attention.attention_mask), [B, 1, T, S] for jax.nn.dot_product_attention."""
    slots_11S = jnp.arange(length, dtype=positions_BT.dtype)[None, None, :]
    pos_BT1 = positions_BT[:, :, None]
    visible_BTS = slots_11S <= pos_BT1
    if sliding_window > 0:
        visible_BTS &= pos_BT1 - slots_11S < sliding_window
    return visible_BTS[:, None, :, :]


def attend(q_BTNH: jax.Array, kv: LayerKV, positions_BT: jax.Array, sliding_window: int = 0) -> jax.Array:
    """Queries over the whole (already written) buffer with the slot mask. The XLA kernel: the mask is over cache
    slots, not the T x T causal shape cuDNN's flash kernel takes."""
    dtype = q_BTNH.dtype
    return jax.nn.dot_product_attention(q_BTNH, kv.k.astype(dtype), kv.v.astype(dtype),
                                        mask=visible_B1TS(positions_BT, kv.k.shape[1], sliding_window),
                                        implementation="xla")
