"""The preference batch: groups of whole pairs (maxlm.data.preference has the layout).

The leading dim of every field is the group (`rows`), so any split of a batch (hosts, devices, microbatches) keeps a
pair's chosen and rejected sequences together. Sequence fields are [rows, seqs, length] (seqs = 1 packed, 2 padded);
per-pair fields [rows, pairs] (pairs = data.pairs_per_row packed, 1 padded).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.struct
import jax
import numpy as np

from maxlm.config import Config
from maxlm.train.batch import Field

SEQ_TOKENS = Field(("rows", "seqs", "length"), np.int32, ("act_batch", None, "act_length"))
SEQ_WEIGHTS = Field(("rows", "seqs", "length"), np.float32, ("act_batch", None, "act_length"))
PAIR_VALUES = Field(("rows", "pairs"), np.float32, ("act_batch", None))


@flax.struct.dataclass
class PreferenceBatch:
    FIELDS: ClassVar[dict[str, Field]] = {
        "inputs": SEQ_TOKENS, "targets": SEQ_TOKENS, "inputs_segment_ids": SEQ_TOKENS, "inputs_positions": SEQ_TOKENS,
        "targets_weights": SEQ_WEIGHTS, "pair_mask": PAIR_VALUES, "margin": PAIR_VALUES,
        "ref_chosen_logps": PAIR_VALUES, "ref_rejected_logps": PAIR_VALUES}

    inputs: jax.Array  # [N, S, T] int32
    targets: jax.Array  # [N, S, T] int32
    inputs_segment_ids: jax.Array  # [N, S, T] int32: 2k+1 chosen, 2k+2 rejected of pair k, 0 padding
    inputs_positions: jax.Array  # [N, S, T] int32
    targets_weights: jax.Array  # [N, S, T] float32: 1 on response targets
    pair_mask: jax.Array  # [N, K] float32: 1 for a real pair
    margin: jax.Array  # [N, K] float32 (reward models)
    ref_chosen_logps: jax.Array  # [N, K] float32 (dpo.reference: precomputed)
    ref_rejected_logps: jax.Array  # [N, K] float32


def preference_sizes(cfg: Config) -> dict[str, int]:
    """The symbolic dims of a preference batch beyond rows and length."""
    packed = cfg.data.packing != "none"
    return {"seqs": 1 if packed else 2, "pairs": cfg.data.pairs_per_row if packed else 1}


def preference_batch(arrays: dict[str, Any]) -> PreferenceBatch:
    """A batch from a dict of (numpy or jax) arrays holding every field (tests and the reference pass)."""
    return PreferenceBatch(**{k: arrays[k] for k in PreferenceBatch.FIELDS})
