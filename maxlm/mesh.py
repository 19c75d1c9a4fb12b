"""The device mesh and everything that turns logical axis names into `NamedSharding`s.

Sharding decisions live in one table, `mesh.rules` in the config; this module only applies it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxlm.config import MESH_AXES, Config, ConfigError, resolve_mesh_shape
from maxlm.treepath import path_name

LogicalRules = tuple[tuple[str, Any], ...]


def logical_rules(cfg: Config) -> LogicalRules:
    """The config's rules table as Flax expects it: ((logical, mesh_axis | (mesh_axes...) | None), ...)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in cfg.mesh.rules)


def build_mesh(cfg: Config, devices: list[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor, expert) mesh; multi-slice runs put the dcn_* factors across slices (DCN).

    Axis types are Auto: with Explicit axes (jax.make_mesh's new default) sharding constraints become assertions.
    """
    devices = devices if devices is not None else jax.devices()
    shape = resolve_mesh_shape(cfg.mesh, len(devices))
    ici = [shape[f"ici_{a}"] for a in MESH_AXES]
    dcn = [shape[f"dcn_{a}"] for a in MESH_AXES]
    if math.prod(dcn) > 1:
        if hasattr(devices[0], "slice_index") or jax.process_count() > 1:
            device_array = mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices=devices, process_is_granule=not hasattr(devices[0], "slice_index"),
                allow_split_physical_axes=True)
        else:
            device_array = _emulated_hybrid_mesh(devices, ici, dcn)
    else:
        try:
            device_array = mesh_utils.create_device_mesh(ici, devices=devices, allow_split_physical_axes=True)
        except (AssertionError, NotImplementedError, ValueError):
            device_array = np.asarray(devices).reshape(ici)  # e.g. CPU or irregular topologies
    return Mesh(device_array, MESH_AXES)


def _emulated_hybrid_mesh(devices: list[jax.Device], ici: list[int], dcn: list[int]) -> np.ndarray:
    """Single-process stand-in for slices (CPU tests): contiguous device groups play the slices, laid out as
    create_hybrid_device_mesh does (each axis = dcn-major x ici)."""
    n = len(ici)
    arr = np.asarray(devices).reshape(dcn + ici)
    arr = arr.transpose([i for pair in zip(range(n), range(n, 2 * n)) for i in pair])
    return arr.reshape([d * i for d, i in zip(dcn, ici)])


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """Makes the mesh and the rules visible to `nn.with_logical_constraint` inside traced model code."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_specs(boxed_tree: Any) -> Any:
    """Per-leaf PartitionSpec of *logical* names, read from `nn.with_logical_partitioning` metadata."""
    return nn.get_partition_spec(boxed_tree)


def to_mesh_shardings(logical: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    return nn.logical_to_mesh_sharding(logical, mesh, rules)


def check_divisible(abstract: Any, shardings: Any, mesh: Mesh) -> None:
    """Every sharded dimension must split evenly; names the parameter and the fix otherwise."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    shard_flat = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sh in zip(flat, shard_flat):
        for dim, axes in zip(leaf.shape, sh.spec):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            n = math.prod(mesh.shape[a] for a in axes)
            if dim % n:
                raise ConfigError(f"parameter {path_name(path)} of shape {tuple(leaf.shape)}: dimension "
                                  f"{dim} cannot be split over mesh axes {axes} (size {n}); change mesh.rules or "
                                  f"the mesh sizes")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
    """Optimizer moments follow their parameter's sharding; scalars (counts) are replicated."""
    return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated(mesh),
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


def process_rows(sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
    """The global rows [start, stop) that this process's devices hold under the batch sharding: the rows its data
    pipeline must yield (maxlm.data.shards). Raises ConfigError if they are not one contiguous range."""
    index_map = sharding.addressable_devices_indices_map((global_rows, 1))
    covered = sorted({range(*idx[0].indices(global_rows))[::1] for idx in index_map.values()},
                     key=lambda r: r.start)
    start, stop = covered[0].start, covered[0].stop
    for r in covered[1:]:
        if r.start > stop:
            raise ConfigError(f"this process holds rows {[(c.start, c.stop) for c in covered]} of the global batch, "
                              "not one contiguous range; order the mesh's batch axes so each host's devices are "
                              "adjacent")
        stop = max(stop, r.stop)
    return start, stop

