"""This process's rows of every global batch, the same rows whatever the number of processes.

Why: packing is a stream (a row holds whatever chunks came next), so the rows a pipeline yields depend on which
documents it reads. If each process read "its 1/N of the documents", the global batch would change with N, and a
2 x 4-device run would not reproduce a 1 x 8-device one (before this module, synthetic data was not split at all:
both processes yielded the same rows, so half of every global batch was a duplicate).

The fix: the global batch of B rows is split into `data.shards` = S fixed, independent pipelines (logical shard k
reads documents k, k + S, ... and yields rows [k B/S, (k+1) B/S) of every batch). A process owns a contiguous range
of global rows (whatever its devices hold under the batch sharding) and builds only the shards that range touches:
with S >= processes each process reads only its own documents; with S < processes, processes sharing a shard each
build it and keep their part of its rows. Either way, global row r of step s is the same for any process count.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np

from maxlm.config import ConfigError, DataConfig
from maxlm.data.pipeline import build_dataset

log = logging.getLogger(__name__)

STATE_VERSION = 1
_GUARDED = ("shards", "rows", "shard_index", "shard_count")  # what must match for the saved positions to apply


def owned_shards(rows: tuple[int, int], batch_size: int, shards: int) -> list[tuple[int, slice]]:
    """(logical shard, slice of that shard's rows) for the global rows [start, stop) of one process."""
    start, stop = rows
    per = batch_size // shards
    out = []
    for k in range(start // per, -(-stop // per)):
        lo, hi = max(start, k * per), min(stop, (k + 1) * per)
        out.append((k, slice(lo - k * per, hi - k * per)))
    return out


class ProcessBatches(grain.DatasetIterator):
    """Iterator of this process's rows [start, stop) of each global batch (a dict of [stop - start, T] arrays).

    Its state holds every owned shard's position (saved per process in checkpoints); restoring refuses a different
    shard or process layout unless `data.resume=reshuffle`, as the single-stream iterator does.
    """

    def __init__(self, data: DataConfig, *, vocab_size: int, global_batch_size: int, rows: tuple[int, int], seed: int,
                 process_index: int = 0, process_count: int = 1, total_steps: int = 0, split: str = "train") -> None:
        super().__init__()
        self.iters: list = []  # set before anything can fail: grain's __del__ calls close() on a half-built iterator
        start, stop = rows
        if not 0 <= start < stop <= global_batch_size:
            raise ConfigError(f"data: process rows [{start}, {stop}) are not inside the global batch of "
                              f"{global_batch_size} rows")
        self.shards, self.rows, self.resume = data.shards, (start, stop), data.resume
        self.meta = {"shards": data.shards, "rows": [start, stop], "shard_index": process_index,
                     "shard_count": process_count}
        self.parts = owned_shards(self.rows, global_batch_size, data.shards)
        if len(self.parts) == 1 and self.parts[0][1] != slice(0, global_batch_size // data.shards):
            log.info("data: data.shards=%d < %d processes: this process builds logical shard %d and keeps rows %s "
                     "of it (set data.shards to a multiple of the process count to read disjoint documents)",
                     data.shards, process_count, self.parts[0][0], self.parts[0][1])
        self.iters = [iter(build_dataset(data, vocab_size=vocab_size, batch_size=global_batch_size // data.shards,
                                         seed=seed, shard_index=k, shard_count=data.shards, total_steps=total_steps,
                                         split=split)) for k, _ in self.parts]

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [{key: v[rows] for key, v in next(it).items()} for it, (_, rows) in zip(self.iters, self.parts)]
        if len(batches) == 1:
            return batches[0]
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    def stats(self) -> dict[str, float]:
        """Fill rate and realised mixture over this process's shards (each weighted by the positions it yielded)."""
        weights = np.asarray([max(1, it.positions) for it in self.iters], np.float64)
        per = [it.stats() for it in self.iters]
        return {key: float(np.dot([p[key] for p in per], weights) / weights.sum()) for key in per[0]}

    def get_state(self) -> dict[str, Any]:
        return {"maxlm_data_stream": STATE_VERSION, "maxlm_process_batches": STATE_VERSION, **self.meta,
                "streams": [it.get_state() for it in self.iters]}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("maxlm_process_batches") != STATE_VERSION:
            if len(self.iters) == 1 and self.meta["shards"] == 1 and self.meta["shard_count"] == 1:
                self.iters[0].set_state(state)  # a single-stream state written before logical shards existed
                return
            raise ConfigError("data: the checkpoint's data state predates data.shards; set data.resume=reshuffle "
                              "to continue with a new data order")
        changed = {k: (state.get(k), self.meta[k]) for k in _GUARDED if state.get(k) != self.meta[k]}
        if not changed:
            for it, saved in zip(self.iters, state["streams"]):
                it.set_state(saved)
            return
        what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        if self.resume != "reshuffle":
            raise ConfigError(f"data: cannot restore the data iterator exactly ({what}): the saved positions belong "
                              "to another process or shard layout. Resume with the original processes and "
                              "data.shards, or set data.resume=reshuffle to keep the step and continue with a new "
                              "shuffle of every source")
        batch = int(state["streams"][0]["batch"]) if state.get("streams") else 0
        log.warning("data: %s since the checkpoint; data.resume=reshuffle: continuing from batch %d with a new "
                    "shuffle of every source", what, batch)
        for it in self.iters:
            it.restart(batch)

    def close(self) -> None:
        for it in self.iters:
            it.close()
