"""Weighted mixing of example streams by *tokens*, deterministically.

`data.mixture` weights are token shares (what papers report: "30% code" means 30% of training tokens), so the
mixer draws by token deficit rather than by coin flips over examples: each draw goes to the component that is
furthest below its target share of the tokens emitted so far (ties to the heavier weight, then the lower index).
That is deterministic given the seed (the randomness is in each component's own shuffled order), keeps the
realised proportions within one example of the target at every point of the stream (a seeded coin would drift
by ~sqrt(n)), and needs no knowledge of each source's mean document length. Its state is the per-component token
count plus the parents' states, so resumption is exact.

Each example is tagged with its component id (a `sources` array alongside `inputs`; ids start at 1 so that 0 is
padding), which packing carries into the rows; the stream wrapper (maxlm.data.stream) turns those tags into the
realised proportions it logs. A single source goes through the same mixer (weight 1), so there is one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np


class TokenMixIterDataset(grain.IterDataset):
    """Mixes `parents` (iterators of {"inputs", "targets"} examples) with token shares `weights`."""

    def __init__(self, parents: Sequence[grain.IterDataset], weights: Sequence[float], ids: Sequence[int]) -> None:
        super().__init__(list(parents))
        total = float(sum(weights))
        if len(parents) != len(weights) or len(ids) != len(weights) or total <= 0 or min(weights) < 0:
            raise ValueError(f"need one non-negative weight and one id per parent, got {weights}, {ids}")
        self._weights = np.asarray(weights, np.float64) / total
        self._ids = [int(i) for i in ids]

    def __iter__(self) -> "_TokenMixIterator":
        return _TokenMixIterator([p.__iter__() for p in self.parents], self._weights, self._ids)

    def __str__(self) -> str:
        return f"TokenMixIterDataset(weights={self._weights.round(4).tolist()}, ids={self._ids})"


class _TokenMixIterator(grain.DatasetIterator):
    _MUTATES_ELEMENT_SPEC = True

    def __init__(self, parents: list[grain.DatasetIterator], weights: np.ndarray, ids: list[int]) -> None:
        super().__init__(parents)
        self._w = weights
        self._ids = ids
        self._tokens = np.zeros(len(parents), np.float64)
        # Ranking for ties: heavier weight first, then lower index (argmax takes the first maximum).
        self._order = np.lexsort((np.arange(len(parents)), -weights))

    def __next__(self) -> dict[str, np.ndarray]:
        deficit = self._w * self._tokens.sum() - self._tokens
        k = int(self._order[int(np.argmax(deficit[self._order]))])
        example = next(self._parents[k])
        self._tokens[k] += len(example["targets"])
        return example | {"sources": np.full(len(example["inputs"]), self._ids[k], np.int32)}

    def get_state(self) -> dict[str, Any]:
        return {"tokens": [int(t) for t in self._tokens], "parents": [p.get_state() for p in self._parents]}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["parents"]) != len(self._parents):
            raise ValueError(f"mixture state has {len(state['parents'])} sources, this pipeline {len(self._parents)}")
        self._tokens = np.asarray(state["tokens"], np.float64)
        for p, s in zip(self._parents, state["parents"]):
            p.set_state(s)

    def __str__(self) -> str:
        return f"TokenMixIterator(ids={self._ids})"
