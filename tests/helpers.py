"""Shared test helpers: small configs and hand-made batches."""

from __future__ import annotations

import numpy as np

from maxlm.config import Config, load_config, resolve_config_path


# Tests that compare across meshes, implementations or against Hugging Face compute in float32: `model.dtype: auto`
# is bfloat16 on some CPUs (maxlm.model.precision), whose rounding would swamp their tolerances.
F32 = "model.dtype=float32"


def tiny_config(*overrides: str) -> Config:
    """The `tiny` preset in float32 (an override may still set model.dtype)."""
    return load_config(resolve_config_path("tiny"), [F32, *overrides])


def random_batch(rows: int, seq_len: int, vocab: int, seed: int = 0, docs_per_row: int = 1) -> dict[str, np.ndarray]:
    """Rows of random tokens split into `docs_per_row` packed documents each (segment ids 1..n, positions restart)."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(4, vocab, size=(rows, seq_len + 1)).astype(np.int32)
    seg = np.zeros((rows, seq_len), np.int32)
    pos = np.zeros((rows, seq_len), np.int32)
    bounds = np.linspace(0, seq_len, docs_per_row + 1).astype(int)
    for d in range(docs_per_row):
        seg[:, bounds[d]:bounds[d + 1]] = d + 1
        pos[:, bounds[d]:bounds[d + 1]] = np.arange(bounds[d + 1] - bounds[d])
    weights = np.ones((rows, seq_len), np.float32)
    weights[:, bounds[1:] - 1] = 0.0  # the last token of a document has no next-token target
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "inputs_segment_ids": seg, "inputs_positions": pos,
            "targets_weights": weights}
