"""The maxlm checkpoint format, in one place: step directories, their items, and what `meta` says.

Training (maxlm.train.checkpoint) writes and resumes it; conversion (maxlm.convert) writes it from Hugging Face
weights and reads it back; neither imports the other. One directory per step under a checkpoint directory:

    {step}/params     parameters (orbax's pytree format, OCDBT + zarr: one array per leaf)
    {step}/opt_state  optimizer state, laid out like the parameters
    {step}/train      JSON: step, PRNG key data, non-finite counters
    {step}/data       every process's data-iterator state (grain's handler: process_{i}-of-{n}.json)
    {step}/meta       JSON: maxlm version, mesh, process count, parameter count, every leaf's shape, the config

A LoRA run's `params` hold only the adapters (`layers/attn/q_lora_a`, ...) and `opt_state` only their moments; its
meta's `lora` entry points at the frozen base (`lora_base_pointer`), which is never copied into the checkpoint.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any

import jax
import numpy as np
from etils import epath

import maxlm
from maxlm.config import Config, ConfigError
from maxlm.treepath import path_name

ITEM_PARAMS, ITEM_OPT, ITEM_TRAIN, ITEM_DATA, ITEM_META = "params", "opt_state", "train", "data", "meta"
META_FILE = "metadata"  # the file orbax's JsonSave writes inside an item directory


def checkpoint_dir(cfg: Config) -> str:
    """`checkpoint.dir`, or `{run_dir}/checkpoints`; local paths made absolute (orbax needs that), URLs kept."""
    return absolute(cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints"))


def absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def tree_shapes(tree: Any) -> dict[str, list]:
    """`{"layers/attn/q": [[2, 64, 4, 16], "float32"], ...}` for every array leaf of a (possibly abstract) tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_name(path): [list(leaf.shape), str(np.dtype(leaf.dtype))]
            for path, leaf in flat if hasattr(leaf, "shape")}


def make_meta(cfg: Config, step: int, params: Any, opt_state: Any | None, *, mesh_shape: dict[str, int],
              process_count: int, source: str) -> dict[str, Any]:
    """What every maxlm checkpoint says about itself (also written by `maxlm convert from-hf`)."""
    shapes = tree_shapes(params)
    return {"format": "maxlm", "maxlm_version": maxlm.__version__, "step": step, "source": source,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mesh": dict(mesh_shape), "process_count": process_count,
            "param_count": sum(math.prod(s) for s, _ in shapes.values()), "params": shapes,
            "opt_state": tree_shapes(opt_state) if opt_state is not None else None, "config": cfg.to_dict()} | (
                {"lora": lora_base_pointer(cfg)} if cfg.lora.enabled else {})


def lora_base_pointer(cfg: Config) -> dict[str, Any]:
    """Where a LoRA run's frozen base comes from: `base`, the absolute path of `load_parameters_from` (a maxlm
    checkpoint or a Hugging Face directory), or None for the seeded initialisation `init_seed`; plus the adapters'
    settings that merging and PEFT export need."""
    lo = cfg.lora
    return {"base": absolute(cfg.load_parameters_from) if cfg.load_parameters_from else None,
            "init_seed": cfg.seed, "base_dtype": lo.base_dtype or cfg.model.param_dtype, "rank": lo.rank,
            "alpha": lo.alpha, "rslora": lo.rslora, "targets": list(lo.targets)}


def read_meta(step_dir: str) -> dict[str, Any]:
    return json.loads((epath.Path(step_dir) / ITEM_META / META_FILE).read_text())


def _is_step_dir(path: epath.Path) -> bool:
    return (path / ITEM_META / META_FILE).exists() and (path / ITEM_PARAMS).exists()


def resolve_step_dir(path: str) -> tuple[str, int]:
    """A maxlm checkpoint given as one step directory, a checkpoint directory (its newest step) or a run directory
    (its `checkpoints/`) -> (step directory, step)."""
    p = epath.Path(absolute(path))
    if _is_step_dir(p):
        return str(p), int(p.name) if p.name.isdigit() else int(read_meta(str(p))["step"])
    for candidate in (p, p / "checkpoints"):
        if candidate.is_dir():
            steps = sorted((int(c.name) for c in candidate.iterdir() if c.name.isdigit() and _is_step_dir(c)),
                           reverse=True)
            if steps:
                return str(candidate / str(steps[0])), steps[0]
    raise ConfigError(f"{path} is neither a maxlm checkpoint (a step directory with params/ and meta/, or a "
                      "directory of them) nor a Hugging Face model directory (config.json + *.safetensors)")
