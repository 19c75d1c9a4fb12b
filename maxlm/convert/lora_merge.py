"""`maxlm lora merge`: a LoRA run's adapters folded into its base, W' = W + s * A B, one layer tensor at a time.

The base is read from where the checkpoint's meta points (a Hugging Face directory or a maxlm checkpoint, through
the same unit sources as conversion) or re-created from its init seed; it is first rounded to the dtype the run held
it in (`lora.base_dtype`), so the merged model computes what the adapted model trained. The result is a plain maxlm
checkpoint (OUT/0) whose config has LoRA off, or with `hf=True` a Hugging Face directory (through `to_hf`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from maxlm.checkpoint_format import ITEM_META, META_FILE, make_meta, read_meta, resolve_step_dir
from maxlm.config import Config, ConfigError, ModelConfig, config_from_dict
from maxlm.convert.layout import Unit, param_leaves
from maxlm.convert.params_store import CheckpointUnitSource, ParamsReader, ParamsWriter
from maxlm.convert.peft import adapter_leaves, spec_from_pointer
from maxlm.model.heads import SCORE
from maxlm.model.lora import A_SUFFIX, B_SUFFIX, LoraSpec, adapter_product


class InitUnitSource:
    """The plain model's seeded initialisation, as units (a LoRA run trained on a random base)."""

    def __init__(self, cfg: ModelConfig, seed: int) -> None:
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        from maxlm.model import Decoder

        params = nn.unbox(jax.jit(lambda r: Decoder(cfg).init(r, jnp.zeros((1, 8), jnp.int32))["params"])(
            jax.random.key(seed)))
        self.leaves = {leaf.path: leaf for leaf in param_leaves(cfg)}
        self.units: dict[Unit, np.ndarray] = {}
        for leaf in self.leaves.values():
            if leaf.path[0] not in params:  # a reward head: not part of the base (it trained with the adapters)
                continue
            x = params
            for k in leaf.path:
                x = x[k]
            x = np.asarray(x)
            for j, unit in enumerate(leaf.units()):
                self.units[unit] = x[j] if leaf.stacked else x

    def read_unit(self, unit: Unit, shape: tuple[int, ...]) -> np.ndarray:
        return self.units[unit]


def _base_source(pointer: dict[str, Any], cfg: ModelConfig) -> Any:
    from maxlm.convert.families import architecture_of, read_hf_config
    from maxlm.convert.hf import HFUnitSource, is_hf_dir

    base = pointer.get("base")
    if base is None:
        return InitUnitSource(cfg, int(pointer["init_seed"]))
    if not os.path.exists(base) and "://" not in base:
        raise ConfigError(f"the LoRA run's base {base} does not exist any more; merging needs the base weights")
    if is_hf_dir(base):
        return HFUnitSource(base, architecture_of(read_hf_config(base), base), cfg)
    return CheckpointUnitSource(resolve_step_dir(base)[0])


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def merge_checkpoint(checkpoint: str, out_dir: str, hf: bool = False, dtype: str | None = None) -> str:
    """Writes the merged model of a LoRA checkpoint to `out_dir`: a maxlm checkpoint (OUT/0), or with `hf` a Hugging
    Face directory. Returns the path written."""
    step_dir, _ = resolve_step_dir(checkpoint)
    meta = read_meta(step_dir)
    if "lora" not in meta:
        raise ConfigError(f"{checkpoint} is not a LoRA run's checkpoint (its meta has no `lora` entry)")
    out = epath.Path(os.path.abspath(out_dir))
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out_dir} exists and is not empty; choose a new output directory")
    run_cfg = config_from_dict(meta["config"])
    cfg: Config = dataclasses.replace(run_cfg, load_parameters_from="",
                                      lora=dataclasses.replace(run_cfg.lora, enabled=False, load_adapter_from=""))
    pointer = meta["lora"]
    spec = spec_from_pointer(pointer)
    if hf:
        tmp = tempfile.mkdtemp(prefix="maxlm-merge-")
        try:
            _write_merged(step_dir, cfg, spec, pointer, os.path.join(tmp, "ckpt"))
            from maxlm.convert.hf import to_hf

            return to_hf(os.path.join(tmp, "ckpt"), out_dir, dtype=dtype)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _write_merged(step_dir, cfg, spec, pointer, out_dir)


def _write_merged(step_dir: str, cfg: Config, spec: LoraSpec, pointer: dict[str, Any], out_dir: str) -> str:
    model = cfg.model
    base = _base_source(pointer, model)
    held = _np_dtype(pointer.get("base_dtype") or model.param_dtype)
    adapters = {leaf.path: leaf for leaf in adapter_leaves(model, spec)}
    reader = ParamsReader(step_dir)
    leaves = param_leaves(model)
    out = epath.Path(os.path.abspath(out_dir))
    final, partial = out / "0", out / "0.partial"
    if partial.exists():
        shutil.rmtree(partial)
    writer = ParamsWriter(str(partial), leaves, _np_dtype(model.param_dtype))
    for leaf in leaves:
        a_path = leaf.path[:-1] + (leaf.path[-1] + A_SUFFIX,)
        b_path = leaf.path[:-1] + (leaf.path[-1] + B_SUFFIX,)
        if leaf.path[0] == SCORE:  # a reward model's head trains with the adapters and lives in the checkpoint
            writer.write(leaf.path, np.asarray(reader.read(leaf.path, ()), np.float32), ())
            continue
        for j, unit in enumerate(leaf.units()):
            w = np.asarray(base.read_unit(unit, leaf.unit_shape)).astype(held).astype(np.float32)
            if a_path in adapters:
                index = (j,) if leaf.stacked else ()
                a = np.asarray(reader.read(a_path, index), np.float32)
                b = np.asarray(reader.read(b_path, index), np.float32)
                w = w + spec.scale * np.asarray(adapter_product(a, b, w.ndim))  # experts: one product each
            writer.write(leaf.path, w, (j,) if leaf.stacked else ())
    writer.finalize()
    import jax

    abstract = {"/".join(leaf.path): jax.ShapeDtypeStruct(leaf.shape, writer.dtype) for leaf in leaves}
    out_meta = make_meta(cfg, 0, abstract, None, mesh_shape={}, process_count=1,
                         source=f"lora-merge:{step_dir}")
    (partial / ITEM_META).mkdir()
    (partial / ITEM_META / META_FILE).write_text(json.dumps(out_meta))
    partial.rename(final)
    return str(final)
