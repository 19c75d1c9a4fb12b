"""The vocabulary of architecture tables: how config.json keys and tensor names map to maxlm.

An architecture (llama.py, mistral.py, qwen.py, mixtral.py, qwen3_moe.py) is data: a list of `ConfigKey`s, a
list of `TensorMap`s, the maxlm options it fixes and the few fields derived from several keys (RoPE scaling,
window, MoE layer pattern). The generic code in hf.py does everything else (reading, writing, stacking layers,
experts, shape checks), so adding an architecture means writing its table, not new conversion code.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from maxlm.config import ModelConfig

REQUIRED = object()  # ConfigKey default: config.json must have the key


class Transform(ABC):
    """Per-tensor layout change between one Hugging Face tensor and one maxlm unit (or one expert of it)."""

    @abstractmethod
    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The Hugging Face shape of a maxlm tensor of `shape`."""

    @abstractmethod
    def to_maxlm(self, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Hugging Face tensor -> maxlm layout of `shape`."""

    @abstractmethod
    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """maxlm tensor -> Hugging Face layout."""

    def row_index(self, shape: tuple[int, ...], rows: slice) -> tuple[slice, ...] | None:
        """Where Hugging Face rows `rows` of a tensor land in the maxlm tensor of `shape`, when that is a rectangular
        block (then a large tensor, such as an embedding, converts block by block); None otherwise."""
        return None


class Same(Transform):
    """Identical layout (embeddings [V, D], norm scales [D])."""

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def to_maxlm(self, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return hf.reshape(shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return x

    def row_index(self, shape: tuple[int, ...], rows: slice) -> tuple[slice, ...] | None:
        return (rows,) + (slice(None),) * (len(shape) - 1) if shape else None


class Flatten(Transform):
    """A Hugging Face vector <-> a maxlm tensor of the same elements, e.g. a q bias [N*H] <-> [N, H]."""

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(shape),)

    def to_maxlm(self, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return hf.reshape(shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(-1)


@dataclass(frozen=True)
class Linear(Transform):
    """A torch `nn.Linear` weight [out, in] <-> maxlm's [in dims..., out dims...], whose first `n_in` dims are the
    input: q [D, N, H] (n_in 1), o [N, H, D] (n_in 2), gate [D, F] (n_in 1), lm_head [D, V] (n_in 1). The head
    dimension keeps Hugging Face's order, which is already the rotate-half RoPE layout maxlm uses, so no
    permutation is needed (that is only for Meta's original interleaved checkpoints)."""

    n_in: int = 1

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in])

    def to_maxlm(self, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.ascontiguousarray(hf.T).reshape(shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        n_in = math.prod(x.shape[:self.n_in])
        return np.ascontiguousarray(x.reshape(n_in, -1).T)

    def row_index(self, shape: tuple[int, ...], rows: slice) -> tuple[slice, ...] | None:
        # Rows are output features: a column block of a 2-D maxlm weight such as lm_head [D, V].
        return (slice(None), rows) if self.n_in == 1 and len(shape) == 2 else None


@dataclass(frozen=True)
class TensorMap:
    """One maxlm unit <-> Hugging Face tensor(s).

    `maxlm` is the path inside a layer (`per_layer`) or in the params tree. In `hf`, `{i}` is the layer index and
    `{e}` an expert index: a unit whose name has `{e}` is maxlm's [E, ...] stack of E Hugging Face tensors
    (e.g. Mixtral's `block_sparse_moe.experts.{e}.w1.weight`), each converted by `transform`.
    """

    maxlm: tuple[str, ...]
    hf: str
    transform: Transform = field(default_factory=Same)
    per_layer: bool = True
    when: Callable[[ModelConfig], bool] = lambda cfg: True

    def hf_names(self, layer: int | None, shape: tuple[int, ...]) -> list[str]:
        fmt = {"i": layer if layer is not None else ""}
        if "{e}" in self.hf:
            return [self.hf.format(**fmt, e=e) for e in range(shape[0])]
        return [self.hf.format(**fmt)]

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.transform.hf_shape(shape[1:] if "{e}" in self.hf else shape)

    def to_maxlm(self, tensors: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        if "{e}" in self.hf:
            return np.stack([self.transform.to_maxlm(t, shape[1:]) for t in tensors])
        return self.transform.to_maxlm(tensors[0], shape)

    def to_hf(self, x: np.ndarray) -> list[np.ndarray]:
        if "{e}" in self.hf:
            return [self.transform.to_hf(x[e]) for e in range(x.shape[0])]
        return [self.transform.to_hf(x)]

    def row_blocks(self, shape: tuple[int, ...], itemsize: int, max_bytes: int
                   ) -> list[tuple[slice, tuple[slice, ...]]] | None:
        """(Hugging Face rows, maxlm index) blocks of at most `max_bytes` covering a single-tensor unit larger than
        that, or None when it converts in one piece (small, expert-stacked, or not row-separable)."""
        hf_shape = self.hf_shape(shape)
        nbytes = math.prod(shape) * itemsize
        if "{e}" in self.hf or nbytes <= max_bytes or not hf_shape or self.transform.row_index(
                shape, slice(0, 1)) is None:
            return None
        step = max(1, max_bytes // (nbytes // hf_shape[0]))
        return [(slice(a, min(a + step, hf_shape[0])),
                 self.transform.row_index(shape, slice(a, min(a + step, hf_shape[0]))))
                for a in range(0, hf_shape[0], step)]


@dataclass(frozen=True)
class ConfigKey:
    """config.json key <-> ModelConfig field. `default` (a value, or a function of the whole config.json) applies
    when the key is absent, as the transformers config class would fill it; REQUIRED makes it an error.
    `training_only` keys (loss coefficients, router noise) do not change what the weights compute: loading weights
    into a run that sets them differently (fine-tuning with another balance coefficient) is allowed."""

    hf: str
    field: str
    default: Any = REQUIRED
    training_only: bool = False


@dataclass(frozen=True)
class Architecture:
    """Everything architecture-specific about a Hugging Face model family."""

    model_type: str  # config.json "model_type"
    hf_class: str  # config.json "architectures"[0]
    config_keys: tuple[ConfigKey, ...]
    tensors: tuple[TensorMap, ...]
    fixed: dict[str, Any]  # ModelConfig values the architecture implies (also how to-hf recognises it)
    # config.json (already flattened by `normalize`) -> raises ConfigError for features maxlm cannot represent
    check: Callable[[dict[str, Any]], None] = lambda hf: None
    # config.json as transformers writes it -> flat keys (e.g. rope_parameters.rope_theta -> rope_theta)
    normalize: Callable[[dict[str, Any]], dict[str, Any]] = lambda hf: dict(hf)
    # ModelConfig fields that are not one config.json key each (RoPE scaling, sliding window, MoE layer pattern),
    # from the normalised config.json (after `check`); `extra_hf_config` writes them back
    derive: Callable[[dict[str, Any]], dict[str, Any]] = lambda hf: {}
    # keys written to config.json beyond the mapped ones (activation, biases, RoPE type, ...)
    extra_hf_config: Callable[[ModelConfig], dict[str, Any]] = lambda cfg: {}

    def matches(self, cfg: ModelConfig) -> bool:
        return all(getattr(cfg, k) == v for k, v in self.fixed.items())

    def tensor_for(self, layer: int | None, local: tuple[str, ...], cfg: ModelConfig) -> TensorMap | None:
        for t in self.tensors:
            if t.maxlm == local and t.per_layer == (layer is not None) and t.when(cfg):
                return t
        return None
