"""A maxlm checkpoint's parameters at the tensorstore level, one layer slice at a time.

orbax saves and restores whole pytrees held in memory. That is right for training (each process holds only its
shards) but not for converting a model on one CPU host: a scanned leaf such as `layers.mlp.gate` of an 8B Llama is
[32, 4096, 14336], 7.5 GB in float32. So the converters read and write parameters directly through tensorstore, in
orbax's own layouts for a pytree item: one zarr array per leaf named by its dotted path (`layers.attn.q`), inside
an OCDBT key-value store (what training writes) or one directory per leaf (what `ParamsWriter` writes), plus
orbax's `_METADATA` tree file that says which. orbax restores what `ParamsWriter` writes and `ParamsReader` reads
what orbax wrote (tests check both directions; `orbax-checkpoint` is pinned below 0.13 in setup.cfg).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts
from etils import epath

from maxlm.config import ConfigError, ModelConfig
from maxlm.convert.layout import Leaf, Unit, chunk_shape, param_leaves, unit_name
from maxlm.checkpoint_format import ITEM_PARAMS, absolute, read_meta

ORBAX_METADATA = "_METADATA"
WRITE_BLOCK_BYTES = 64 * 2**20  # the most converted data held at once while writing
_ZARR_DTYPES = {np.dtype(np.float32): "<f4", np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float16): "<f2"}


def _url(path: str) -> str:
    path = absolute(path)
    return path if "://" in path else "file://" + path


def model_config_from_meta(meta: dict[str, Any]) -> ModelConfig:
    """The ModelConfig a checkpoint was written with (keys this version does not know are ignored)."""
    saved = (meta.get("config") or {}).get("model") or {}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


class ParamsReader:
    """Opens the zarr array of any parameter leaf of a step directory and reads slices of it."""

    def __init__(self, step_dir: str) -> None:
        self.item_dir = str(epath.Path(step_dir) / ITEM_PARAMS)
        md = json.loads((epath.Path(self.item_dir) / ORBAX_METADATA).read_text())
        self.use_ocdbt = bool(md.get("use_ocdbt", True))
        self.driver = "zarr3" if md.get("use_zarr3", False) else "zarr"
        self._context = ts.Context()
        self._open: dict[tuple[str, ...], ts.TensorStore] = {}

    def _spec(self, path: tuple[str, ...]) -> dict[str, Any]:
        name = ".".join(path)
        if self.use_ocdbt:
            return {"driver": self.driver, "kvstore": {"driver": "ocdbt", "base": _url(self.item_dir) + "/"},
                    "path": name + "/"}
        return {"driver": self.driver, "kvstore": _url(self.item_dir) + "/" + name + "/"}

    def array(self, path: tuple[str, ...]) -> ts.TensorStore:
        if path not in self._open:
            self._open[path] = ts.open(self._spec(path), open=True, read=True, context=self._context).result()
        return self._open[path]

    def read(self, path: tuple[str, ...], index: Any = ()) -> np.ndarray:
        return np.asarray(self.array(path)[index].read().result())


class ParamsWriter:
    """Creates every leaf's zarr array up front, then takes whole leaves or single layer slices."""

    def __init__(self, step_dir: str, leaves: list[Leaf], dtype: np.dtype) -> None:
        self.item_dir = str(epath.Path(step_dir) / ITEM_PARAMS)
        epath.Path(self.item_dir).mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self._context = ts.Context()
        self._arrays: dict[tuple[str, ...], ts.TensorStore] = {}
        self._chunks: dict[tuple[str, ...], list[int]] = {}
        for leaf in leaves:
            chunks = chunk_shape(leaf.shape, self.dtype.itemsize, leaf.stacked)
            metadata = {"shape": list(leaf.shape), "chunks": chunks, "dtype": _ZARR_DTYPES[self.dtype],
                        "compressor": None, "fill_value": None, "dimension_separator": "."}
            # One file per chunk, not OCDBT: OCDBT never rewrites data in place, so the partial-chunk writes of
            # block-by-block conversion would leave superseded copies behind (+50% on disk, measured).
            spec = {"driver": "zarr", "kvstore": _url(self.item_dir) + "/" + ".".join(leaf.path) + "/",
                    "metadata": metadata}
            self._arrays[leaf.path] = ts.open(spec, create=True, context=self._context).result()
            self._chunks[leaf.path] = chunks

    def write(self, path: tuple[str, ...], value: np.ndarray, index: tuple[Any, ...] = ()) -> None:
        """`value` into leaf `path` at `index` (e.g. `(layer,)` of a stacked leaf), cast to the checkpoint dtype
        block by block so that no full-size converted copy is ever held."""
        # A tensorstore slice keeps the original coordinates; translate it so the block loop below counts from 0.
        target = self._arrays[path][index] if index else self._arrays[path]
        target = target.translate_to[0] if target.rank else target
        value = np.asarray(value)
        if value.ndim == 0:
            target.write(value.astype(self.dtype)).result()
            return
        rows = max(1, WRITE_BLOCK_BYTES // max(1, value[:1].size * self.dtype.itemsize))
        n = value.shape[0]
        for r in range(0, n, rows):  # tensorstore slices must stay in bounds (unlike numpy's)
            target[r:min(r + rows, n)].write(value[r:r + rows].astype(self.dtype)).result()

    def finalize(self) -> None:
        """orbax's tree metadata: which leaves exist and that they restore as jax.Arrays."""
        tree = {str(path): {"key_metadata": [{"key": k, "key_type": 2} for k in path],
                            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                               "write_shape": self._chunks[path]}}
                for path in self._arrays}
        md = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
              "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        (epath.Path(self.item_dir) / ORBAX_METADATA).write_text(json.dumps(md))


class CheckpointUnitSource:
    """Units of a maxlm checkpoint in whatever layout it was written (used to load it into another layout and to
    export it to Hugging Face)."""

    def __init__(self, step_dir: str, meta: dict[str, Any] | None = None) -> None:
        self.step_dir = step_dir
        self.meta = meta or read_meta(step_dir)
        self.model = model_config_from_meta(self.meta)
        self.reader = ParamsReader(step_dir)
        self.where: dict[Unit, tuple[Leaf, int | None]] = {}
        saved = self.meta.get("params") or {}
        for leaf in param_leaves(self.model):
            key = "/".join(leaf.path)
            if key in saved and tuple(saved[key][0]) != leaf.shape:
                raise ConfigError(f"checkpoint {step_dir}: {key} has shape {tuple(saved[key][0])} on disk but the "
                                  f"model it records builds {leaf.shape} (written by another maxlm version?)")
            for j, unit in enumerate(leaf.units()):
                self.where[unit] = (leaf, j if leaf.stacked else None)

    def check_unit(self, unit: Unit, shape: tuple[int, ...]) -> None:
        if unit not in self.where:
            raise ConfigError(f"the checkpoint has no {unit_name(unit)} (shape {shape} wanted)")
        have = self.where[unit][0].unit_shape
        if have != tuple(shape):
            raise ConfigError(f"{unit_name(unit)} has shape {have} in the checkpoint but {tuple(shape)} in this "
                              "config")

    def read_unit(self, unit: Unit, shape: tuple[int, ...], block: tuple[Any, ...] = ()) -> np.ndarray:
        """The unit, or the `block` (an index into it) of it."""
        self.check_unit(unit, shape)
        leaf, index = self.where[unit]
        return self.reader.read(leaf.path, (() if index is None else (index,)) + tuple(block))
