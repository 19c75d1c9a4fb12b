"""The DPO reference model, selected in this one place (`dpo.reference`).

  frozen       the reference weights live in `TrainState.frozen`, sharded by the same rules as the policy, outside
               the optimizer; the step evaluates them under stop_gradient in the same jitted program. They are not
               written into checkpoints: a resumed run loads them again from where they came from
               (`dpo.reference_from`, else the run's starting weights: `load_parameters_from` or the seeded init).
  precomputed  one pass of the reference weights over every group of the tokenized data stores each pair's
               log-probs beside the data (`ref-<model>-<data>.npz` next to the pairs), so training holds one model;
               the batch carries them (`ref_chosen_logps`, `ref_rejected_logps`). The file is named by the
               reference's identity and the data's content hash: a resumed or later run reuses it, a change of
               either rebuilds it.
  base         with LoRA, the base weights without the adapters (maxlm.train.lora_state.lora_loss hands the base
               tree to the loss as its frozen tree): no second copy and no extra pass over the data (TRL disables
               the adapters for the reference pass; Tunix shares the backbone).
  none         reference-free losses (orpo, simpo).
Both frozen and precomputed compute the reference with the same function (`pair_logps` without router jitter),
so they agree to rounding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from maxlm.config import Config
from maxlm.train.pair_logps import pair_logps

log = logging.getLogger(__name__)


def uses_frozen(cfg: Config) -> bool:
    """Whether the train state carries a frozen reference tree."""
    return cfg.train.objective == "dpo" and cfg.dpo.reference == "frozen"


def reference_source(cfg: Config) -> str:
    """Where the reference weights come from: `dpo.reference_from`, else the starting weights."""
    return cfg.dpo.reference_from or cfg.load_parameters_from


def reference_logps(cfg: Config, model: nn.Module, batch: Any, frozen: Any
                    ) -> tuple[jax.Array | None, jax.Array | None]:
    """(ref_chosen_logps, ref_rejected_logps) [N, K] for the step's loss, without gradient."""
    mode = cfg.dpo.reference
    if mode == "precomputed":
        return batch.ref_chosen_logps, batch.ref_rejected_logps
    if mode in ("frozen", "base"):  # base: `frozen` is the LoRA base tree, so the decoder runs without adapters
        (rc, rr, _, _), _, _ = pair_logps(cfg, model, jax.lax.stop_gradient(frozen), batch, None)
        return jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    return None, None


def reference_identity(cfg: Config) -> str:
    """A stable name for the reference weights: the model config plus their source (a path and the modification
    time of its metadata, or the init seed)."""
    src = reference_source(cfg)
    if src:
        path = os.path.abspath(os.path.expanduser(src))
        stamp = max((os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs
                     if f.endswith((".json", ".safetensors"))), default=0.0) if os.path.isdir(path) else 0.0
        where: Any = [path, stamp]
    else:
        where = ["init", cfg.seed]
    blob = json.dumps([cfg.model.__dict__, where], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def precompute(cfg: Config, model: nn.Module, params: Any, groups: dict[str, np.ndarray], batch_type: type,
               to_device: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference log-probs of every group [G, K] (chosen, rejected): `params` over the groups in batches of
    `batch_size` (the last batch padded with empty groups). `to_device` places a dict of numpy arrays as a
    sharded batch of `batch_type`."""
    n = len(groups["pair_mask"])

    @jax.jit
    def run(p: Any, b: Any) -> tuple[jax.Array, jax.Array]:
        (rc, rr, _, _), _, _ = pair_logps(cfg, model, p, b, None)
        return rc, rr

    out_c, out_r = [], []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        chunk = {k: np.where((idx < n).reshape((-1,) + (1,) * (v.ndim - 1)), v[np.minimum(idx, n - 1)], 0)
                 for k, v in groups.items()}
        out = run(params, to_device(chunk))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
        rc, rr = jax.device_get(out)
        keep = idx < n
        out_c.append(np.asarray(rc)[keep])
        out_r.append(np.asarray(rr)[keep])
    return np.concatenate(out_c).astype(np.float32), np.concatenate(out_r).astype(np.float32)


def attach_precomputed(cfg: Config, model: nn.Module, ref_params_fn: Any, groups: dict[str, np.ndarray],
                       cache_path: str, data_hash: str, batch_type: type, to_device: Any, batch_size: int
                       ) -> str:
    """Fills `groups["ref_*_logps"]` from the stored file for (reference, data), computing and storing it first
    when missing. `ref_params_fn()` gives the reference weights (only called when a pass is needed).
    Returns the file's path."""
    directory = os.path.dirname(cache_path) if cache_path else os.path.join(cfg.run_dir, "preference")
    path = os.path.join(directory, f"ref-{reference_identity(cfg)}-{data_hash}.npz")
    if os.path.isfile(path):
        with np.load(path) as z:
            rc, rr = z["ref_chosen_logps"], z["ref_rejected_logps"]
        log.info("dpo.reference=precomputed: reusing %s", path)
    else:
        log.info("dpo.reference=precomputed: one pass over %d groups -> %s", len(groups["pair_mask"]), path)
        rc, rr = precompute(cfg, model, ref_params_fn(), groups, batch_type, to_device, batch_size)
        if jax.process_index() == 0:
            os.makedirs(directory, exist_ok=True)
            tmp = path + ".tmp.npz"
            np.savez(tmp, ref_chosen_logps=rc, ref_rejected_logps=rr)
            os.replace(tmp, path)
    groups["ref_chosen_logps"] = rc * groups["pair_mask"]
    groups["ref_rejected_logps"] = rr * groups["pair_mask"]
    return path


def ensure_same_shapes(policy: Any, reference: Any, where: str) -> None:
    """One line naming the first parameter whose shape differs between the policy and the reference."""
    from maxlm.config import ConfigError

    flat_p = dict(jax.tree_util.tree_flatten_with_path(policy)[0])
    flat_r = dict(jax.tree_util.tree_flatten_with_path(reference)[0])
    for path, leaf in flat_p.items():
        other = flat_r.get(path)
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if other is None:
            raise ConfigError(f"{where}: the reference has no parameter {name}; it must be the policy's architecture")
        if tuple(other.shape) != tuple(leaf.shape):
            raise ConfigError(f"{where}: the reference's {name} has shape {tuple(other.shape)} but the policy's is "
                              f"{tuple(leaf.shape)}; use a reference of the same model config")

