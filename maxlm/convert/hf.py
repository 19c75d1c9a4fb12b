"""Hugging Face <-> maxlm, generic over architecture tables (llama.py, mistral.py, qwen.py, mixtral.py, qwen3_moe.py;
a new one goes in ARCHITECTURES).

    from_hf(HF_DIR, OUT)      safetensors + config.json -> a maxlm checkpoint directory (OUT/0/{params,meta})
    to_hf(CKPT, HF_DIR)       a maxlm checkpoint (any step, scanned or not) -> safetensors + config.json
    load_hf_params(...)       safetensors -> sharded parameters of a run (`load_parameters_from=HF_DIR`)

Memory: every direction works one tensor at a time. from_hf reads one Hugging Face tensor (safe_open), converts
it and writes it into its layer's slice of the zarr array; to_hf reads one layer slice and appends it to a
streaming safetensors writer. Tensors above BLOCK_BYTES (the embedding and LM head: [128256, 4096] = 2.1 GB in
float32 for Llama-3-8B) go through in row blocks. So the peak is a few copies of the largest per-layer tensor
(Llama-3-8B: the 14336 x 4096 MLP weights, 235 MB in float32) above the interpreter's own ~0.25 GB; measured by
tests/benchmarks/bench_checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from maxlm.config import Config, ConfigError, ModelConfig, check_static, load_config, parse_overrides
from maxlm.convert.layout import Unit, assemble_params, param_leaves, unit_name
from maxlm.convert.families import CONFIG_FILE, architecture_for, architecture_of, model_fields_from_hf, \
    read_hf_config
from maxlm.convert.hf_options import rope_context
from maxlm.convert.mapping import Architecture, TensorMap
from maxlm.convert.params_store import CheckpointUnitSource, ParamsWriter
from maxlm.convert.safetensors_io import PlannedTensor, SafetensorsReader, SafetensorsWriter
from maxlm.checkpoint_format import ITEM_META, META_FILE, make_meta, read_meta, resolve_step_dir
from maxlm.config.paths import check_dir_path, writable_dir

BLOCK_BYTES = 64 * 2**20  # tensors larger than this (embeddings, LM heads) convert in row blocks


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and any(
        n.endswith(".safetensors") for n in os.listdir(path))


def hf_config_from_model(cfg: ModelConfig, *, max_position_embeddings: int, dtype: str) -> dict[str, Any]:
    """The config.json of a maxlm model (token ids are maxlm's tokenizer's: pad 0, bos 2, eos 3). With llama3/yarn
    RoPE scaling, max_position_embeddings is at least the scaled context."""
    from maxlm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

    arch = architecture_for(cfg)
    out: dict[str, Any] = {"architectures": [arch.hf_class], "model_type": arch.model_type}
    for key in arch.config_keys:
        value = getattr(cfg, key.field)
        out[key.hf] = cfg.head_dim_resolved if key.field == "head_dim" else value
    out |= arch.extra_hf_config(cfg)
    out |= {"max_position_embeddings": rope_context(cfg, max_position_embeddings), "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "dtype": dtype, "torch_dtype": dtype, "use_cache": True}
    return out


def _compare_model(hf: dict[str, Any], cfg: ModelConfig, where: str, hf_dir: str) -> None:
    """One line naming every config.json value that disagrees with the run's model config."""
    arch, fields = model_fields_from_hf(hf, where)
    effective = dataclasses.replace(cfg, head_dim=cfg.head_dim_resolved,
                                    moe_ffn_dim=cfg.moe_ffn_dim or cfg.ffn_dim)
    hf_name = {k.field: k.hf for k in arch.config_keys}
    training_only = {k.field for k in arch.config_keys if k.training_only}
    diffs = [f"{hf_name.get(k, k)}={v!r} there but model.{k}={getattr(effective, k)!r} here"
             for k, v in fields.items() if getattr(effective, k) != v and k not in training_only]
    if diffs:
        raise ConfigError(f"{where}: the Hugging Face model does not match this config: {'; '.join(diffs)} (print "
                          f"the matching model section with `maxlm convert config {hf_dir}`)")


class HFUnitSource:
    """maxlm units read from a Hugging Face directory through an architecture table."""

    def __init__(self, hf_dir: str, arch: Architecture, cfg: ModelConfig) -> None:
        self.reader = SafetensorsReader(hf_dir)
        self.arch = arch
        self.cfg = cfg

    def _entry(self, unit: Unit) -> TensorMap:
        entry = self.arch.tensor_for(unit[0], unit[1], self.cfg)
        if entry is None:
            raise ConfigError(f"no Hugging Face tensor is mapped to maxlm's {unit_name(unit)} for "
                              f"{self.arch.model_type} (add it to the architecture table)")
        return entry

    def check_unit(self, unit: Unit, shape: tuple[int, ...]) -> None:
        entry = self._entry(unit)
        want = entry.hf_shape(shape)
        for name in entry.hf_names(unit[0], shape):
            if name not in self.reader:
                raise ConfigError(f"tensor {name} (for maxlm's {unit_name(unit)}) is missing from "
                                  f"{self.reader.directory}")
            have = self.reader.shape(name)
            if have != want:
                raise ConfigError(f"{name} has shape {have} but this config needs {want} for maxlm's "
                                  f"{unit_name(unit)} {tuple(shape)}")

    def read_unit(self, unit: Unit, shape: tuple[int, ...]) -> np.ndarray:
        entry = self._entry(unit)
        return entry.to_maxlm([self.reader.read(n) for n in entry.hf_names(unit[0], shape)], shape)

    def unit_blocks(self, unit: Unit, shape: tuple[int, ...], itemsize: int, block_bytes: int = BLOCK_BYTES
                    ) -> Iterator[tuple[tuple, np.ndarray]]:
        """(maxlm index, block) pieces of a unit: one piece, or row blocks of a large tensor such as the embedding,
        so that converting it never holds it whole."""
        entry = self._entry(unit)
        blocks = entry.row_blocks(shape, itemsize, block_bytes)
        if blocks is None:
            yield (), self.read_unit(unit, shape)
            return
        (name,) = entry.hf_names(unit[0], shape)
        for rows, index in blocks:
            block_shape = tuple(len(range(n)[i]) for n, i in zip(shape, index))
            yield index, entry.transform.to_maxlm(self.reader.read_rows(name, rows), block_shape)


# ----------------------------------------------------------------------------------------------------------
# The three operations


def load_hf_params(hf_dir: str, cfg: ModelConfig, abstract: Any) -> Any:
    """Parameters for a run (ShapeDtypeStructs with shardings in `abstract`) from a Hugging Face directory."""
    where = f"load_parameters_from={hf_dir}"
    hf = read_hf_config(hf_dir)
    _compare_model(hf, cfg, where, hf_dir)
    source = HFUnitSource(hf_dir, architecture_of(hf, where), cfg)
    return assemble_params(source, cfg, abstract, where)


def from_hf(hf_dir: str, out_dir: str, overrides: list[str] | None = None, block_bytes: int = BLOCK_BYTES
            ) -> tuple[str, Config]:
    """Converts a Hugging Face model to a maxlm checkpoint directory `out_dir` holding step 0.

    `overrides` are config keys (e.g. `model.scan_layers=false`, `model.param_dtype=bfloat16`); the model shape
    always comes from config.json. Tensors above `block_bytes` convert in row blocks of that size. Written under
    a temporary name and renamed at the end, so an interrupted conversion never looks like a checkpoint. Returns
    (step directory, the Config recorded in its metadata).
    """
    check_dir_path(out_dir, "OUT")
    hf = read_hf_config(hf_dir)
    arch, fields = model_fields_from_hf(hf, hf_dir)
    cfg = load_config(None, overrides or [])
    explicit = parse_overrides(overrides or []).get("model", {})
    cfg.model = dataclasses.replace(cfg.model, **{k: v for k, v in fields.items() if k not in explicit})
    if cfg.model.head == "scalar" and "objective" not in parse_overrides(overrides or []).get("train", {}):
        cfg.train.objective = "reward"  # a sequence-classification model is a reward model
    check_static(cfg)
    out = epath.Path(writable_dir(out_dir, "OUT"))
    if any(out.iterdir()):
        raise ConfigError(f"{out_dir} exists and is not empty; choose a new output directory")
    final, partial = out / "0", out / "0.partial"
    if partial.exists():
        shutil.rmtree(partial)
    source = HFUnitSource(hf_dir, arch, cfg.model)
    leaves = param_leaves(cfg.model)
    for leaf in leaves:  # every shape checked before a byte is written
        for unit in leaf.units():
            source.check_unit(unit, leaf.unit_shape)
    writer = ParamsWriter(str(partial), leaves, np.dtype(cfg.model.param_dtype))
    for leaf in leaves:  # one layer's tensor (or one row block of a large global one) at a time
        for j, unit in enumerate(leaf.units()):
            for index, block in source.unit_blocks(unit, leaf.unit_shape, writer.dtype.itemsize, block_bytes):
                writer.write(leaf.path, block, ((j,) if leaf.stacked else ()) + index)
    writer.finalize()
    import jax

    abstract = {"/".join(leaf.path): jax.ShapeDtypeStruct(leaf.shape, writer.dtype) for leaf in leaves}
    meta = make_meta(cfg, 0, abstract, None, mesh_shape={}, process_count=1, source=f"hf:{os.path.abspath(hf_dir)}")
    (partial / ITEM_META).mkdir()
    (partial / ITEM_META / META_FILE).write_text(json.dumps(meta))
    partial.rename(final)
    return str(final), cfg


def hf_plan(cfg: ModelConfig, dtype: np.dtype) -> list[tuple[Unit, TensorMap, tuple[int, ...], list[PlannedTensor]]]:
    """Every Hugging Face tensor of a maxlm model, in the order they are written: globals, then layer by layer."""
    arch = architecture_for(cfg)
    units = [(unit, leaf.unit_shape) for leaf in param_leaves(cfg) for unit in leaf.units()]
    units.sort(key=lambda u: (-1 if u[0][0] is None else u[0][0]))
    plan = []
    for unit, shape in units:
        entry = arch.tensor_for(unit[0], unit[1], cfg)
        if entry is None:
            raise ConfigError(f"no Hugging Face tensor is mapped to maxlm's {unit_name(unit)} for {arch.model_type}")
        names = entry.hf_names(unit[0], shape)
        plan.append((unit, entry, shape, [PlannedTensor(n, entry.hf_shape(shape), dtype) for n in names]))
    return plan


def to_hf(checkpoint: str, out_dir: str, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
          block_bytes: int = BLOCK_BYTES) -> str:
    """Exports a maxlm checkpoint (step directory, checkpoint directory or run directory) as a Hugging Face model
    directory readable by `transformers.AutoModelForCausalLM.from_pretrained`. `dtype` defaults to the
    checkpoint's parameter dtype; tensors above `block_bytes` are exported in row blocks of that size."""
    import ml_dtypes

    check_dir_path(out_dir, "OUT")
    step_dir, _ = resolve_step_dir(checkpoint)
    meta = read_meta(step_dir)
    source = CheckpointUnitSource(step_dir, meta)
    cfg = source.model
    dtype = dtype or cfg.param_dtype
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    if os.listdir(writable_dir(out_dir, "OUT")):
        raise ConfigError(f"{out_dir} exists and is not empty; choose a new output directory")
    plan = hf_plan(cfg, np_dtype)
    writer = SafetensorsWriter(out_dir, [t for *_, tensors in plan for t in tensors], max_shard_bytes)
    itemsize = np.dtype(cfg.param_dtype if cfg.param_dtype != "bfloat16" else ml_dtypes.bfloat16).itemsize
    for unit, entry, shape, tensors in plan:
        blocks = entry.row_blocks(shape, itemsize, block_bytes)
        if blocks is None:  # one layer's tensor at a time
            for planned, array in zip(tensors, entry.to_hf(source.read_unit(unit, shape))):
                writer.write(planned.name, array.astype(np_dtype))
            continue
        for _, index in blocks:  # a large tensor as consecutive row blocks
            (array,) = entry.to_hf(source.read_unit(unit, shape, index))
            writer.write(tensors[0].name, array.astype(np_dtype))
    writer.close()
    seq_len = int(((meta.get("config") or {}).get("data") or {}).get("seq_len") or 2048)
    hf = hf_config_from_model(cfg, max_position_embeddings=seq_len, dtype=dtype)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(hf, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, f, indent=2)
    return out_dir
