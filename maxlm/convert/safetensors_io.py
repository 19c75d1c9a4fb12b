"""Hugging Face safetensors, one tensor at a time in both directions.

Reading uses `safetensors.safe_open` across the shards that `model.safetensors.index.json` lists, opening the file
for each tensor: `get_tensor` copies out only that tensor, and closing drops the memory map, so the pages read
do not accumulate in the process (a mapping kept open for the whole conversion made the source model's size show
up in the peak RSS). Writing streams: the header of every shard is computed up front
from the planned names, shapes and dtypes, then each tensor's bytes are appended as it is produced, so converting
an 8B model never holds more than one tensor in host memory (`safetensors.numpy.save_file` needs a whole shard's
tensors at once).

File format (https://github.com/huggingface/safetensors): an unsigned little-endian 64-bit header length, a JSON
header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with spaces to a
multiple of 8 bytes, then the raw little-endian tensor bytes in the order of their offsets.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safe_open's numpy backend needs)
import numpy as np

from maxlm.config import ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16",
                np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


def dtype_name(dtype: np.dtype) -> str:
    try:
        return _DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"no safetensors dtype for {dtype}") from None


class SafetensorsReader:
    """Every tensor of a Hugging Face model directory, opened lazily (one mmap per shard file)."""

    def __init__(self, directory: str) -> None:
        from safetensors import safe_open

        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
            weight_map = {}
        if not files:
            raise ConfigError(f"{directory}: no *.safetensors files (only safetensors checkpoints are supported; "
                              "convert .bin files with transformers' save_pretrained(safe_serialization=True))")
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name in files:  # headers only: names and shapes
            with safe_open(os.path.join(directory, name), framework="numpy") as f:
                for key in f.keys():
                    if weight_map.get(key, name) == name:
                        self._where[key] = name
                        self._shapes[key] = tuple(f.get_slice(key).get_shape())

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        self._file(name)
        return self._shapes[name]

    def read(self, name: str) -> np.ndarray:
        """One tensor, copied out of its file (the only host memory the reader holds)."""
        from safetensors import safe_open

        with safe_open(os.path.join(self.directory, self._file(name)), framework="numpy") as f:
            return f.get_tensor(name)

    def read_rows(self, name: str, rows: slice) -> np.ndarray:
        """Rows `rows` of a tensor (a block of a large one), read without the rest."""
        from safetensors import safe_open

        with safe_open(os.path.join(self.directory, self._file(name)), framework="numpy") as f:
            return f.get_slice(name)[rows]

    def _file(self, name: str) -> str:
        try:
            return self._where[name]
        except KeyError:
            raise ConfigError(f"{self.directory}: tensor {name!r} is missing from the safetensors files") from None


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class SafetensorsWriter:
    """Writes planned tensors into shards of at most `max_shard_bytes` (plus `model.safetensors.index.json` when
    there is more than one), accepting them in plan order, whole or as consecutive blocks of rows."""

    def __init__(self, directory: str, plan: Iterable[PlannedTensor], max_shard_bytes: int = 5 * 2**30,
                 metadata: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.plan = list(plan)
        self.metadata = {"format": "pt"} | (metadata or {})  # transformers expects format=pt
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in self.plan:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard_of = {t.name: i for i, shard in enumerate(shards) for t in shard}
        self._shards = shards
        self._next = 0  # index into self.plan
        self._rows = 0  # rows of plan[_next] written so far
        self._open_shard = -1
        self._f = None
        os.makedirs(directory, exist_ok=True)

    def _start_shard(self, i: int) -> None:
        if self._f is not None:
            self._f.close()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for t in self._shards[i]:
            header[t.name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(os.path.join(self.directory, self.files[i]), "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._open_shard = i

    def write(self, name: str, array: np.ndarray) -> None:
        """The whole tensor `name`, or its next block of rows (leading axis)."""
        expected = self.plan[self._next] if self._next < len(self.plan) else None
        if expected is None or expected.name != name:
            raise ValueError(f"tensor {name!r} written out of plan order (expected {expected and expected.name!r})")
        array = np.asarray(array)
        whole = tuple(array.shape) == expected.shape
        rows = expected.shape[0] if whole or not expected.shape else array.shape[0]
        fits = whole or (array.shape[1:] == expected.shape[1:] and self._rows + rows <= expected.shape[0])
        if not fits or array.dtype != np.dtype(expected.dtype):
            raise ValueError(f"{name}: got {array.shape} {array.dtype} after {self._rows} rows, planned "
                             f"{expected.shape} {expected.dtype}")
        shard = self._shard_of[name]
        if shard != self._open_shard:
            self._start_shard(shard)
        # Raw bytes in native order, which is little-endian on every platform jax supports; viewing as bytes
        # avoids the extra copy that tobytes() makes of a large tensor.
        self._f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._rows = 0 if whole else self._rows + rows
        if whole or self._rows == expected.shape[0]:
            self._next, self._rows = self._next + 1, 0

    def close(self) -> None:
        if self._next != len(self.plan):
            raise ValueError(f"only {self._next} of {len(self.plan)} planned tensors were written")
        if self._f is not None:
            self._f.close()
            self._f = None
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.plan)},
                     "weight_map": {t.name: self.files[self._shard_of[t.name]] for t in self.plan}}
            with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
