"""`maxlm inspect`: every parameter's shape, logical axes, mesh PartitionSpec and bytes per device.

Shapes come from `jax.eval_shape` and specs from the rules table alone, so a 70B config inspects in seconds
for any device count, without devices or memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from maxlm.config import Config, validate
from maxlm.flops import count_params
from maxlm.mesh import logical_rules
from maxlm.model import abstract_params
from maxlm.train.optimizer import make_optimizer
from maxlm.treepath import path_name


def _per_device(shape: tuple[int, ...], spec: Any, mesh_shape: dict[str, int]) -> int:
    n = 1
    for axes in spec:
        if axes is None:
            continue
        for a in axes if isinstance(axes, tuple) else (axes,):
            n *= mesh_shape[a]
    return math.ceil(math.prod(shape) / n)


def _tree_rows(boxed: Any, rules: Any, mesh_shape: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(per-leaf rows, mesh specs by name, bytes per device) of a boxed abstract tree."""
    logical = nn.get_partition_spec(boxed)
    params = nn.unbox(boxed)
    rows: dict[str, Any] = {}
    total = 0
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    logical_flat = jax.tree_util.tree_leaves(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    specs = {}
    for (path, leaf), lspec in zip(flat, logical_flat):
        name = path_name(path, ".")
        mspec = nn.logical_to_mesh_axes(tuple(lspec), rules)
        specs[name] = mspec
        nbytes = _per_device(leaf.shape, mspec, mesh_shape) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        rows[name] = {"shape": list(leaf.shape), "logical_axes": list(lspec), "spec": [
            list(a) if isinstance(a, tuple) else a for a in mspec], "dtype": str(leaf.dtype), "bytes_per_device": nbytes}
    return rows, specs, total


def _opt_bytes(tx: Any, params: Any, specs: dict[str, Any], mesh_shape: dict[str, int]) -> int:
    """Optimizer state bytes per device: every moment leaf is laid out like its parameter."""
    opt = jax.eval_shape(tx.init, params)
    return sum(int(np.dtype(x.dtype).itemsize) * _per_device(x.shape, s, mesh_shape)
               for x, s in _opt_leaves_with_specs(tx, opt, params, specs))


def inspect_config(cfg: Config, num_devices: int) -> dict[str, Any]:
    mesh_shape = validate(cfg, num_devices)
    rules = logical_rules(cfg)
    # Shapes do not depend on the attention kernel; xla traces anywhere (cuDNN's checks need a GPU present).
    model_cfg = dataclasses.replace(cfg.model, attention="xla")
    boxed = abstract_params(model_cfg)
    rows, specs, param_bytes = _tree_rows(boxed, rules, mesh_shape)
    params = nn.unbox(boxed)
    tx, _ = make_optimizer(cfg)
    opt_bytes = _opt_bytes(tx, params, specs, mesh_shape)
    total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    assert total == count_params(cfg.model).total, "model and maxlm.flops disagree on the parameter count"
    report = {"total_params": total, "mesh": {k: v for k, v in mesh_shape.items() if "_" not in k},
              "bytes_per_device": {"params": param_bytes, "optimizer": opt_bytes, "gradients": param_bytes,
                                   "total_state": 2 * param_bytes + opt_bytes},
              "params": rows}
    if cfg.lora.enabled:
        report["lora"] = _lora_report(dataclasses.replace(cfg, model=model_cfg), tx, rules, mesh_shape)
    return report


def _lora_report(cfg: Config, tx: Any, rules: Any, mesh_shape: dict[str, int]) -> dict[str, Any]:
    """Trainable adapters against the frozen base: what LoRA holds per device instead of full fine-tuning's state."""
    from maxlm.model.lora import lora_spec
    from maxlm.train.lora_state import lora_trees

    adapters, base = lora_trees(cfg, lora_spec(cfg))
    rows, specs, adapter_bytes = _tree_rows(adapters, rules, mesh_shape)
    _, _, base_bytes = _tree_rows(base, rules, mesh_shape)
    opt_bytes = _opt_bytes(tx, nn.unbox(adapters), specs, mesh_shape)
    return {"trainable_params": sum(int(np.prod(r["shape"])) for r in rows.values()),
            "bytes_per_device": {"adapters": adapter_bytes, "frozen_base": base_bytes, "gradients": adapter_bytes,
                                 "optimizer": opt_bytes, "total_state": base_bytes + 2 * adapter_bytes + opt_bytes},
            "adapters": rows}


def _opt_leaves_with_specs(tx: Any, opt: Any, params: Any, specs: dict[str, Any]) -> list[tuple[Any, Any]]:
    import optax

    names = jax.tree_util.tree_map_with_path(lambda p, _: path_name(p, "."), params)
    spec_tree = optax.tree_map_params(tx, lambda _, n: specs[n], opt, names,
                                      transform_non_params=lambda _: jax.sharding.PartitionSpec())
    leaves = jax.tree_util.tree_leaves(opt)
    spec_leaves = jax.tree_util.tree_leaves(spec_tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return list(zip(leaves, spec_leaves))


def format_table(report: dict[str, Any]) -> str:
    gib = 2**30
    lines = [f"{'parameter':<28} {'shape':<22} {'logical axes':<40} {'spec':<36} {'MiB/dev':>9}"]
    for name, r in report["params"].items():
        lines.append(f"{name:<28} {str(tuple(r['shape'])):<22} {str(tuple(r['logical_axes'])):<40} "
                     f"{str(tuple(r['spec'])):<36} {r['bytes_per_device'] / 2**20:>9.2f}")
    b = report["bytes_per_device"]
    lines.append(f"total parameters: {report['total_params']:,}  mesh: {report['mesh']}")
    lines.append(f"per device: params {b['params'] / gib:.3f} GiB, grads {b['gradients'] / gib:.3f} GiB, "
                 f"optimizer {b['optimizer'] / gib:.3f} GiB, state total {b['total_state'] / gib:.3f} GiB "
                 f"(activations not included)")
    if "lora" in report:
        lo, b2 = report["lora"], report["lora"]["bytes_per_device"]
        lines.append(f"LoRA: {lo['trainable_params']:,} trainable parameters "
                     f"({100 * lo['trainable_params'] / report['total_params']:.3f}% of {report['total_params']:,}); "
                     f"per device: frozen base {b2['frozen_base'] / gib:.3f} GiB, adapters {b2['adapters'] / gib:.4f} "
                     f"GiB, grads {b2['gradients'] / gib:.4f} GiB, optimizer {b2['optimizer'] / gib:.4f} GiB, state "
                     f"total {b2['total_state'] / gib:.3f} GiB (full fine-tuning above: {b['total_state'] / gib:.3f} GiB)")
    return "\n".join(lines)
