"""Refuse, before anything is allocated, a config whose training step obviously cannot fit in device memory.

Without this, `data.seq_len=100000` on the tiny model compiles for minutes and then dies allocating terabytes.
The estimate is the planner's memory model (maxlm/plan/memory.py: parameters, gradients, Adam moments, a layer
workspace, saved activations under `model.remat`, logits and the attention mask), evaluated on the run's own mesh
and microbatch. That model is approximate (it assumes bf16 activations, and XLA may schedule better or worse), so
only an estimate above OBVIOUS_FACTOR times the device's memory is refused: a step that might fit is left to try.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax

from maxlm.config import Config, ConfigError

OBVIOUS_FACTOR = 2.0


def device_memory_bytes(hbm_from_table: float | None = None) -> tuple[float, str]:
    """(bytes one device can use, where that number came from): the runtime's limit on GPU/TPU, else the hardware
    table's HBM, else (CPU) physical memory shared by the local devices."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        stats = {}
    if stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"{device.device_kind} memory limit"
    if hbm_from_table and jax.default_backend() != "cpu":
        return float(hbm_from_table), "train.hardware's HBM"
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return physical / jax.local_device_count(), f"host memory / {jax.local_device_count()} local devices"


def _batch_parallel(cfg: Config, shape: dict[str, int]) -> int:
    for name, axes in cfg.mesh.rules:
        if name == "act_batch":
            axes = [] if axes is None else axes if isinstance(axes, list) else [axes]
            return math.prod(shape[a] for a in axes)
    return 1


def check_memory(cfg: Config, shape: dict[str, int], hbm_from_table: float | None = None) -> None:
    """Raises ConfigError (one line naming the largest term and the keys that shrink it) when the estimated
    bytes per device exceed OBVIOUS_FACTOR x the device's memory; `shape` is `validate`'s mesh shape."""
    from maxlm.flops import count_params
    from maxlm.plan.memory import estimate_memory
    from maxlm.plan.shape import MoESpec

    m = cfg.model
    moe = MoESpec(m.num_experts, m.experts_per_token) if m.ffn == "moe" else None
    flash = jax.default_backend() == "gpu" and m.attention != "xla"
    rows = max(1, cfg.micro_batch_size // _batch_parallel(cfg, shape))
    est = estimate_memory(m, moe, count_params(m), cfg.data.seq_len, micro_rows=rows, data=shape["data"],
                          fsdp=shape["fsdp"], tensor=shape["tensor"], expert=shape["expert"],
                          grad_accum=cfg.train.grad_accum, remat=m.remat, flash=flash,
                          platform="cuda" if jax.default_backend() == "gpu" else "tpu")
    if cfg.lora.enabled:
        est = lora_estimate(cfg, est, count_params(m))
    capacity, source = device_memory_bytes(hbm_from_table)
    if est.total <= OBVIOUS_FACTOR * capacity:
        return
    terms = {"activations": est.activations + est.working, "logits and attention mask": est.logits,
             "parameters, gradients and optimizer state": est.params + est.grads + est.optimizer,
             "layer workspace": est.workspace}
    largest = max(terms, key=terms.get)
    fixes = {"activations": "lower data.seq_len or train.global_batch_size, raise train.grad_accum or set "
                            "model.remat=full",
             "logits and attention mask": "lower data.seq_len or train.global_batch_size, or raise train.grad_accum",
             "parameters, gradients and optimizer state": "shard more (mesh.fsdp / mesh.tensor) or use more devices",
             "layer workspace": "shard more (mesh.tensor) or use more devices"}[largest]
    raise ConfigError(f"this config needs about {_gb(est.total)} per device ({largest}: {_gb(terms[largest])}; "
                      f"{rows} rows x data.seq_len={cfg.data.seq_len} per microbatch), more than "
                      f"{OBVIOUS_FACTOR:g}x the {_gb(capacity)} a device has ({source}); {fixes} "
                      "(`maxlm plan` picks a mesh and remat that fit)")


def lora_estimate(cfg: Config, est: Any, n_params: Any) -> Any:
    """The full fine-tuning estimate turned into a LoRA run's: the base in `lora.base_dtype` with no gradient or
    optimizer state, plus the adapters (and a reward head), which alone have gradients and Adam moments. Sharding
    of each term is taken to be the full model's (adapters shard like their base weights)."""
    import jax.numpy as jnp

    from maxlm.train.lora_state import base_dtype, lora_trees
    from maxlm.model.lora import lora_spec

    adapters, _ = lora_trees(cfg, lora_spec(cfg))
    trainable = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(adapters))
    frac = trainable / max(n_params.total, 1)
    held = jnp.dtype(base_dtype(cfg)).itemsize / jnp.dtype(cfg.model.param_dtype).itemsize
    return dataclasses.replace(est, params=est.params * (held + frac), grads=est.grads * frac,
                               optimizer=est.optimizer * frac)


def _gb(n: float) -> str:
    return f"{n / 1e12:.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
