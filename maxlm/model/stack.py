"""Where each layer lives: the stack as groups of scanned units, and layer i's path in a parameter tree.

Shared by the decoder (which builds the scans), the MoE statistics and bias update (which read layer i's entries)
and conversion (which maps HF layer i onto maxlm's tree). Depends only on the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

from maxlm.config import ModelConfig


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
