"""Where each maxlm parameter lives, layer by layer, whatever the layer layout.

A *unit* is one tensor in maxlm's per-layer shape: `(i, ("attn", "q"))` is layer i's query projection [D, N, H],
`(None, ("embed", "embedding"))` a global tensor. A scanned model stacks a group's layers on axis 0 of one leaf
(`layers.attn.q` [L, D, N, H]); an unscanned one has a leaf per layer (`layers_3.attn.q`); MoE models have several
groups. Converters and loaders speak units only, so one Hugging Face mapping serves every layout, and a checkpoint
written in one layout loads into the other. Which leaf holds layer i comes from the model itself
(`maxlm.model.transformer.layer_path`), never from a copy of its naming rules.

`assemble_params` builds sharded `jax.Array`s from any unit source through `jax.make_array_from_callback`: every
process reads only the slices its devices hold, and a small byte-bounded cache keeps devices that share a layer
from reading it again.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import flax.linen as nn
import jax
import numpy as np

from maxlm.config import ConfigError, ModelConfig
from maxlm.treepath import path_parts

Local = tuple[str, ...]
Unit = tuple[int | None, Local]  # (layer index or None for a global tensor, path inside the layer / params tree)


@dataclass(frozen=True)
class Leaf:
    """One leaf of a params tree and the units it holds."""

    path: tuple[str, ...]  # keys in the params tree
    shape: tuple[int, ...]
    dtype: np.dtype
    local: Local  # path inside a layer, or `path` itself for a global leaf
    layers: tuple[int, ...]  # global layer indices: along axis 0 when `stacked`, else the single layer (or none)
    stacked: bool

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape

    def units(self) -> list[Unit]:
        return [(i, self.local) for i in self.layers] if self.layers else [(None, self.local)]


def param_leaves(cfg: ModelConfig) -> list[Leaf]:
    """Every parameter leaf of the model `cfg` builds, classified as global or per-layer (scanned or not)."""
    from maxlm.model.transformer import abstract_params

    return classify_leaves(cfg, nn.unbox(abstract_params(cfg)))


def classify_leaves(cfg: ModelConfig, tree: Any) -> list[Leaf]:
    """The leaves of an abstract tree laid out like the model's parameters (the parameters, or LoRA adapters)."""
    from maxlm.model.stack import layer_path

    by_prefix: dict[tuple[str, ...], list[tuple[int, int | None]]] = {}
    for i in range(cfg.n_layers):
        prefix, index = layer_path(cfg, i)
        by_prefix.setdefault(tuple(prefix), []).append((i, index))
    leaves = []
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for key_path, leaf in flat:
        path = path_parts(key_path)
        prefix = max((p for p in by_prefix if path[:len(p)] == p), key=len, default=None)
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        if prefix is None:
            leaves.append(Leaf(path, shape, dtype, path, (), False))
            continue
        entries = by_prefix[prefix]
        stacked = entries[0][1] is not None
        layers = tuple(i for i, _ in sorted(entries, key=lambda e: e[1] or 0))
        if stacked and shape[0] != len(layers):
            raise AssertionError(f"{'.'.join(path)}: leading axis {shape[0]} != {len(layers)} layers in the group")
        leaves.append(Leaf(path, shape, dtype, path[len(prefix):], layers, stacked))
    return leaves


def unit_name(unit: Unit) -> str:
    layer, local = unit
    return ("" if layer is None else f"layer {layer} ") + ".".join(local)


class UnitSource(Protocol):
    """Anything that yields units: a Hugging Face directory, a maxlm checkpoint in another layout."""

    def check_unit(self, unit: Unit, shape: tuple[int, ...]) -> None:
        """Raises ConfigError naming both shapes when the source's tensor for `unit` does not have `shape`."""

    def read_unit(self, unit: Unit, shape: tuple[int, ...]) -> np.ndarray:
        """The unit in maxlm's per-layer layout (any float dtype; callers cast)."""


class UnitCache:
    """Least-recently-used units up to `max_bytes`: the devices of one process often need the same layers."""

    def __init__(self, source: UnitSource, max_bytes: int = 2**30) -> None:
        self.source = source
        self.max_bytes = max_bytes
        self._items: OrderedDict[Unit, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, unit: Unit, shape: tuple[int, ...]) -> np.ndarray:
        if unit in self._items:
            self._items.move_to_end(unit)
            return self._items[unit]
        x = self.source.read_unit(unit, shape)
        if x.nbytes <= self.max_bytes:
            self._items[unit] = x
            self._bytes += x.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        return x


def assemble_params(source: UnitSource, cfg: ModelConfig, abstract: Any, where: str,
                    leaves: list[Leaf] | None = None) -> Any:
    """`abstract` (ShapeDtypeStructs with shardings, in the layout `cfg` builds) filled from `source`; `leaves`
    describe `abstract` (default: the model's parameters; LoRA adapters pass theirs).

    All shapes are checked before anything is read, so a mismatch costs no I/O.
    """
    leaves = {leaf.path: leaf for leaf in (leaves if leaves is not None else param_leaves(cfg))}
    for leaf in leaves.values():
        for unit in leaf.units():
            try:
                source.check_unit(unit, leaf.unit_shape)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
    cache = UnitCache(source)

    def build(key_path: Any, target: jax.ShapeDtypeStruct) -> jax.Array:
        leaf = leaves[path_parts(key_path)]
        dtype = np.dtype(target.dtype)

        def shard(index: tuple[slice, ...]) -> np.ndarray:
            if leaf.stacked:
                picked = range(len(leaf.layers))[index[0]]
                parts = [cache.get((leaf.layers[j], leaf.local), leaf.unit_shape)[index[1:]] for j in picked]
                return np.stack(parts).astype(dtype) if parts else np.zeros((0,) + leaf.unit_shape, dtype)[index]
            return np.asarray(cache.get(leaf.units()[0], leaf.unit_shape)[index], dtype=dtype)

        return jax.make_array_from_callback(target.shape, target.sharding, shard)

    return jax.tree_util.tree_map_with_path(build, abstract)


def chunk_shape(shape: tuple[int, ...], itemsize: int, stacked: bool, max_bytes: int = 64 * 2**20) -> list[int]:
    """Storage chunks of at most `max_bytes` (one layer per chunk for stacked leaves, so writing a layer never
    rewrites its neighbours): the largest dimension is halved until the chunk fits."""
    chunk = list(shape)
    if stacked and chunk:
        chunk[0] = 1
    while math.prod(chunk) * itemsize > max_bytes:
        dims = [d for d in range(1 if stacked else 0, len(chunk)) if chunk[d] > 1]
        if not dims:
            break
        d = max(dims, key=lambda k: chunk[k])
        chunk[d] = -(-chunk[d] // 2)
    return chunk
