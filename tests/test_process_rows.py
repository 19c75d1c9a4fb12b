"""A process's rows of the global batch do not depend on the number of processes (maxlm.data.shards).

Two "processes" owning rows [0, 8) and [8, 16) must together yield exactly the rows one process owning [0, 16)
yields, for synthetic data and for files, with one logical shard (each process builds it and keeps its half) and
with several (each process reads only its shards' documents). Numpy + grain only: no devices needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maxlm.config import ConfigError
from maxlm.data import BATCH_KEYS, train_tokenizer
from maxlm.data.shards import ProcessBatches, owned_shards
from helpers import tiny_config

ROWS = 8


def _take(cfg, rows: tuple[int, int], n: int, index: int = 0, count: int = 1) -> list[dict[str, np.ndarray]]:
    it = ProcessBatches(cfg.data, vocab_size=cfg.model.vocab_size, global_batch_size=ROWS, rows=rows, seed=cfg.seed,
                        process_index=index, process_count=count)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


@pytest.fixture(scope="module")
def text_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(16):
        (root / f"{i:02d}.txt").write_text(f"file {i}: " + " ".join(f"w{(i * j) % 13}" for j in range(20 + i)) + "\n")
    tok = train_tokenizer(str(root / "*.txt"), 300, str(root / "tok.model"))
    return ["data.source=text", f"data.path={root}/*.txt", f"data.tokenizer={tok}", "model.vocab_size=320"]


def test_owned_shards_cover_the_process_rows() -> None:
    assert owned_shards((0, 8), 8, 1) == [(0, slice(0, 8))]
    assert owned_shards((4, 8), 8, 1) == [(0, slice(4, 8))]  # shards < processes: keep part of one shard
    assert owned_shards((4, 8), 8, 4) == [(2, slice(0, 2)), (3, slice(0, 2))]  # shards > processes: whole shards


@pytest.mark.parametrize("source", ["synthetic", "text"])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_two_processes_yield_the_single_process_rows(source: str, shards: int, text_overrides: list[str]) -> None:
    extra = text_overrides if source == "text" else []
    cfg = tiny_config(f"train.global_batch_size={ROWS}", "data.seq_len=32", f"data.shards={shards}", *extra)
    whole = _take(cfg, (0, ROWS), 3)
    halves = [_take(cfg, (0, ROWS // 2), 3, 0, 2), _take(cfg, (ROWS // 2, ROWS), 3, 1, 2)]
    for step in range(3):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]),
                                          whole[step][key])
    if source == "synthetic":  # no duplicated rows (synthetic data was once the same on every process)
        assert len({r.tobytes() for r in whole[0]["inputs"]}) == ROWS


def test_resume_refuses_another_process_layout() -> None:
    cfg = tiny_config(f"train.global_batch_size={ROWS}", "data.seq_len=32", "data.shards=2")
    it = ProcessBatches(cfg.data, vocab_size=cfg.model.vocab_size, global_batch_size=ROWS, rows=(0, 4), seed=0,
                        process_index=0, process_count=2)
    next(it)
    state = it.get_state()
    it.close()
    single = ProcessBatches(cfg.data, vocab_size=cfg.model.vocab_size, global_batch_size=ROWS, rows=(0, ROWS), seed=0)
    with pytest.raises(ConfigError, match="data.resume=reshuffle"):
        single.set_state(state)
    single.close()


def test_shards_must_divide_the_batch() -> None:
    with pytest.raises(ConfigError, match="data.shards=3"):
        tiny_config("train.global_batch_size=8", "data.shards=3")
