"""The outermost layer of the data pipeline: mixture stages, statistics, and a guarded, resumable iterator state.

Why a layer above grain:
  * Stages switch at an exact step. Stage k's pipeline (its own mixture weights, and its own grain worker
    processes when `data.num_workers` > 0) is built when batch `starts[k]` is due and the previous one is closed,
    so a high-quality anneal over the last 10% of steps begins at that step, not a packing buffer later. Each stage
    draws from a fresh shuffle of every source.
  * Realised proportions and fill rate are counted here, in the training process, from the `sources` tag that
    every packed token carries; the counts live in the iterator state, so they survive a resume.
  * The grain state alone restores silently onto a different sharding and then yields a different stream. The
    state here records the shard index and count, the grain worker count and the source names, and `set_state`
    refuses a mismatch with a ConfigError (exit code 2) that says what changed and how to proceed: resume with the
    same processes, or set `data.resume=reshuffle` to keep the step and stage but continue with a new shuffle.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from maxlm.config import ConfigError

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Per-token batch features named event_<name> hold counts (at one position per example) that the stream sums into
# `data_<name>` statistics and removes from the batch (SFT: bad, dropped, truncated).
EVENT_PREFIX = "event_"
# What must match for the saved position to mean the same thing in this run.
_GUARDED = ("shard_count", "shard_index", "num_workers", "sources", "split")


class DataStream(grain.IterDataset):
    """Batches of `make_stage(stage, salt)` pipelines, switched at batch indices `starts` (starts[0] == 0)."""

    def __init__(self, make_stage: Callable[[int, int], grain.IterDataset], starts: list[int], meta: dict[str, Any],
                 names: dict[int, str], tokens_per_batch: int, resume: str = "exact") -> None:
        super().__init__()
        self.make_stage = make_stage
        self.starts = list(starts)
        self.meta = dict(meta)
        self.names = dict(names)
        self.tokens_per_batch = tokens_per_batch
        self.resume = resume

    def __iter__(self) -> "DataIterator":
        return DataIterator(self)

    def __str__(self) -> str:
        return f"DataStream(stages={self.starts}, sources={list(self.names.values())})"


class DataIterator(grain.DatasetIterator):
    """Iterates a DataStream; `stats()` gives the realised mixture and fill rate since the start of training."""

    def __init__(self, ds: DataStream) -> None:
        super().__init__()
        self._ds = ds
        self._batch = 0
        self._stage = -1
        self._salt = 0
        self._inner: grain.DatasetIterator | None = None
        self._tokens = {sid: 0 for sid in ds.names}
        self._positions = 0
        self._real = 0
        self._events: dict[str, int] = {}  # SFT: counts of skipped/dropped/truncated examples (maxlm.data.sft_pipeline)

    def _stage_of(self, batch: int) -> int:
        return bisect.bisect_right(self._ds.starts, batch) - 1

    def _open(self, stage: int) -> None:
        self._close_inner()
        if stage > 0 or self._batch > 0:
            log.info("data: stage %d of %d from batch %d", stage, len(self._ds.starts), self._batch)
        self._inner = self._ds.make_stage(stage, self._salt).__iter__()
        self._stage = stage

    def _close_inner(self) -> None:
        if self._inner is not None and hasattr(self._inner, "close"):
            self._inner.close()
        self._inner = None

    def __next__(self) -> dict[str, np.ndarray]:
        stage = self._stage_of(self._batch)
        if self._inner is None or stage != self._stage:
            self._open(stage)
        assert self._inner is not None
        batch = dict(next(self._inner))
        sources = batch.pop("sources")
        for key in [k for k in batch if k.startswith(EVENT_PREFIX)]:
            name = key[len(EVENT_PREFIX):]
            self._events[name] = self._events.get(name, 0) + int(batch.pop(key).sum())
        real = batch["inputs_segment_ids"] > 0
        ids, counts = np.unique(sources[real], return_counts=True)
        for sid, n in zip(ids.tolist(), counts.tolist()):
            if sid in self._tokens:
                self._tokens[sid] += n
        self._positions += real.size
        self._real += int(real.sum())
        self._batch += 1
        return batch

    def stats(self) -> dict[str, float]:
        """`data_fill_rate` (real tokens / positions) and `data_mix_<source>` (share of real tokens), cumulative
        over the batches this iterator has yielded (including those before a resume), plus the current stage."""
        total = max(1, sum(self._tokens.values()))
        out = {"data_fill_rate": self._real / max(1, self._positions), "data_stage": float(max(self._stage, 0))}
        for sid, n in self._tokens.items():
            out[f"data_mix_{self._ds.names[sid]}"] = n / total
        for name, n in self._events.items():
            out[f"data_{name}"] = float(n)
        return out

    @property
    def batches(self) -> int:
        return self._batch

    @property
    def positions(self) -> int:
        """Token positions yielded so far (real + padding): the weight of this stream's stats among several."""
        return self._positions

    def restart(self, batch: int) -> None:
        """Continue from batch `batch` with a new shuffle of every source (data.resume=reshuffle after the process
        or shard layout changed): the step and stage are kept, the exact position is not."""
        self._close_inner()
        self._batch = batch
        self._salt = batch + 1

    def get_state(self) -> dict[str, Any]:
        return {"maxlm_data_stream": STATE_VERSION, **self._ds.meta, "batch": self._batch, "stage": self._stage,
                "salt": self._salt, "inner": self._inner.get_state() if self._inner is not None else None,
                "tokens": {self._ds.names[sid]: n for sid, n in self._tokens.items()},
                "positions": self._positions, "real": self._real, "events": dict(self._events)}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("maxlm_data_stream") != STATE_VERSION:
            raise ConfigError("data: the checkpoint's data iterator state is not one this version of maxlm wrote; "
                              "set data.resume=reshuffle to continue with a new data order")
        changed = {k: (state.get(k), self._ds.meta.get(k)) for k in _GUARDED if state.get(k) != self._ds.meta.get(k)}
        self._batch = int(state["batch"])
        self._positions, self._real = int(state["positions"]), int(state["real"])
        self._events = {str(k): int(v) for k, v in state.get("events", {}).items()}
        by_name = {name: sid for sid, name in self._ds.names.items()}
        self._tokens = {sid: 0 for sid in self._ds.names}
        for name, n in state.get("tokens", {}).items():
            if name in by_name:
                self._tokens[by_name[name]] = int(n)
        self._close_inner()
        if changed:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            if self._ds.resume != "reshuffle":
                raise ConfigError(f"data: cannot restore the data iterator exactly ({what}): the saved position "
                                  "only means the same stream under the same processes, grain workers and sources. "
                                  "Resume with the original setup, or set data.resume=reshuffle to keep the step "
                                  "and continue with a new shuffle of every source")
            log.warning("data: %s since the checkpoint; data.resume=reshuffle: continuing from batch %d with a new "
                        "shuffle of every source", what, self._batch)
            self.restart(self._batch)
            return
        self._salt = int(state.get("salt", 0))
        stage = self._stage_of(self._batch)
        if state.get("inner") is None:
            return
        if stage != int(state["stage"]):
            log.warning("data: the saved position is in mixture stage %s but batch %d now falls in stage %d "
                        "(train.steps changed?); starting stage %d afresh", state["stage"], self._batch, stage, stage)
            return
        self._open(stage)
        assert self._inner is not None
        self._inner.set_state(state["inner"])

    def close(self) -> None:
        self._close_inner()

    def __str__(self) -> str:
        return f"DataIterator(batch={self._batch}, stage={self._stage})"
