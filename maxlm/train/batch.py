"""The batch contract: each objective's batch is a dataclass that declares its fields.

A field declares its dims (symbolic sizes such as `rows` and `length`, or `pairs` for a preference batch), its dtype
and its logical axes. The step derives one sharding per leaf from the declaration, abstract inputs for compiling
come from it, and the pipeline's dicts of numpy arrays become a typed batch through it. The leading dim of every
field is the example dim (rows, or pairs), sharded over the data-parallel axes (`act_batch`): gradient accumulation
and data parallelism split along it only, so an example (or a pair of sequences) is never split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol

import flax.linen as nn
import flax.struct
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from maxlm.mesh import LogicalRules


@dataclass(frozen=True)
class Field:
    """One batch leaf: symbolic dims, dtype and one logical axis name per dim (the first is always `act_batch`)."""

    dims: tuple[str, ...]
    dtype: Any
    axes: tuple[str | None, ...]

    def __post_init__(self) -> None:
        assert len(self.dims) == len(self.axes) and self.axes[0] == "act_batch", self


class BatchType(Protocol):
    """A `flax.struct.dataclass` with a `FIELDS` table naming exactly its attributes."""

    FIELDS: ClassVar[dict[str, Field]]


ROW_TOKENS = Field(("rows", "length"), np.int32, ("act_batch", "act_length"))
ROW_WEIGHTS = Field(("rows", "length"), np.float32, ("act_batch", "act_length"))


@flax.struct.dataclass
class LmBatch:
    """Packed next-token prediction rows (pretraining, SFT): every field is [B, T].

    `inputs_segment_ids` numbers the documents packed into a row (0 = padding) and `inputs_positions` restarts at 0
    for each; `targets_weights` is 1 on the tokens the loss trains (0 on padding, document ends, SFT prompts).
    """

    FIELDS: ClassVar[dict[str, Field]] = {"inputs": ROW_TOKENS, "inputs_segment_ids": ROW_TOKENS,
                                          "inputs_positions": ROW_TOKENS, "targets": ROW_TOKENS,
                                          "targets_weights": ROW_WEIGHTS}

    inputs: jax.Array
    inputs_segment_ids: jax.Array
    inputs_positions: jax.Array
    targets: jax.Array
    targets_weights: jax.Array


def batch_shardings(batch_type: type, mesh: Mesh, rules: LogicalRules) -> Any:
    """A `batch_type` whose leaves are the NamedShardings its fields' logical axes map to under `rules`."""
    return batch_type(**{name: NamedSharding(mesh, nn.logical_to_mesh_axes(f.axes, rules))
                         for name, f in batch_type.FIELDS.items()})


def abstract_batch(batch_type: type, sizes: Mapping[str, int], shardings: Any = None) -> Any:
    """ShapeDtypeStructs of a global batch (for compiling without data), sizes given per symbolic dim."""
    return batch_type(**{name: jax.ShapeDtypeStruct(tuple(sizes[d] for d in f.dims), f.dtype,
                                                    sharding=getattr(shardings, name) if shardings else None)
                         for name, f in batch_type.FIELDS.items()})


def local_batch(batch_type: type, arrays: Mapping[str, Any]) -> Any:
    """A typed batch from a mapping holding (at least) every declared field, cast to the declared dtypes."""
    missing = [name for name in batch_type.FIELDS if name not in arrays]
    if missing:
        raise KeyError(f"{batch_type.__name__} needs fields {missing}; got {sorted(arrays)}")
    return batch_type(**{name: np.asarray(arrays[name], f.dtype) for name, f in batch_type.FIELDS.items()})


def global_batch(batch_type: type, arrays: Mapping[str, Any], shardings: Any) -> Any:
    """This process's rows -> a typed batch of global `jax.Array`s (multi-host: each host passes its own rows)."""
    local = local_batch(batch_type, arrays)
    return jax.tree_util.tree_map(jax.make_array_from_process_local_data, shardings, local)
