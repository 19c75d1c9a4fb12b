"""Tokenizer and grain pipeline: exact round trips, packing invariants, sources, sharding, resumption, errors.

Everything here is numpy + sentencepiece + grain (no jax), on corpora written to tmp_path, so the file runs in a few
seconds.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from maxlm.config import ConfigError, DataConfig
from maxlm.data import BATCH_KEYS, BOS_ID, EOS_ID, PAD_ID, build_dataset, load_tokenizer, pack_stats, train_tokenizer
from maxlm.data.pipeline import _ChunkDocument
from maxlm.data.sources import NUM_RESERVED_IDS, SyntheticSource

SOURCE_SNIPPETS = [
    "def add(a, b):\n    \"\"\"Adds.\"\"\"\n    return a + b\n",
    "class Point:\n\tdef __init__(self, x):\n\t\tself.x = x  # tabs\n\n\n",
    "if __name__ == '__main__':\r\n    print('héllo wörld ✓ 日本語')\r\n",
    "  leading spaces\n\ttrailing tab\t\n   \n",
    "x = [i ** 2 for i in range(10)]\nassert sum(x) == 285\n",
]
DOCS = [f"document {i}: " + " ".join(f"word{j}" for j in range(i % 7 + 1)) + "\n" for i in range(24)]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tokcorpus")
    for i in range(40):
        _write(root / f"src{i}.py", SOURCE_SNIPPETS[i % len(SOURCE_SNIPPETS)] * (i % 3 + 1) + DOCS[i % len(DOCS)])
    return train_tokenizer(str(root / "*.py"), 600, str(root / "out" / "tok.model"))


def _cfg(**kw: object) -> DataConfig:
    return DataConfig(**{"seq_len": 32, **kw})  # type: ignore[arg-type]


def _take(ds: object, n: int) -> list[dict[str, np.ndarray]]:
    it = iter(ds)  # type: ignore[call-overload]
    return [next(it) for _ in range(n)]


def _segments(batch: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) of every packed example in a batch."""
    out = []
    for r in range(batch["inputs"].shape[0]):
        seg = batch["inputs_segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            m = seg == s
            out.append((batch["inputs"][r][m], batch["targets"][r][m]))
    return out


def _check_invariants(batch: dict[str, np.ndarray], batch_size: int, seq_len: int) -> None:
    assert set(batch) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
        assert batch[k].shape == (batch_size, seq_len), k
        assert batch[k].dtype == (np.float32 if k == "targets_weights" else np.int32), k
    seg, pos, w = batch["inputs_segment_ids"], batch["inputs_positions"], batch["targets_weights"]
    np.testing.assert_array_equal(w, (seg > 0).astype(np.float32))
    for r in range(batch_size):
        s, p = seg[r], pos[r]
        real = s > 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any(), "padding only at the end of a row"
        assert (batch["inputs"][r][~real] == PAD_ID).all() and (batch["targets"][r][~real] == PAD_ID).all()
        ids = s[:n]
        assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all(), "segments 1, 2, 3, ..."
        starts = np.r_[True, ids[1:] != ids[:-1]]
        # positions restart at 0 with each segment and count up by one inside it
        assert (p[:n][starts] == 0).all() and (np.diff(p[:n])[~starts[1:]] == 1).all()
    # Within a segment the target of t is the input of t + 1: next-token pairs come from one document only.
    for inputs, targets in _segments(batch):
        np.testing.assert_array_equal(targets[:-1], inputs[1:])


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trips_source_exactly(tok_path: str) -> None:
    tok = load_tokenizer(tok_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID) == (0, 2, 3)
    assert tok.vocab_size <= 600
    unseen = "def λ(x):\n\treturn x 🙂 — ¿qué?\r\n\n\n\t\t  \n"
    for text in SOURCE_SNIPPETS + [unseen, "", " ", "\n", "\t", "  x  "]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(np.asarray(tok.encode("a\tb"), np.int32)) == "a\tb"  # numpy ids are accepted
    assert tok.decode(pickle.loads(pickle.dumps(tok)).encode(unseen)) == unseen  # workers receive a copy


def test_tokenizer_training_is_deterministic_and_skips_binary(tmp_path: Path, tok_path: str) -> None:
    corpus = Path(tok_path).parent.parent
    (corpus / "zz_binary.py").write_bytes(b"\xff\xfe\x00binary")
    a = train_tokenizer(str(corpus / "*.py"), 600, str(tmp_path / "a.model"))
    b = train_tokenizer(f"{corpus / 'src*.py'},{corpus / 'zz*.py'}", 600, str(tmp_path / "b.model"))
    assert Path(a).read_bytes() == Path(b).read_bytes()
    (corpus / "zz_binary.py").unlink()


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no files match"):
        train_tokenizer(str(tmp_path / "missing" / "*.txt"), 500, str(tmp_path / "t.model"))
    _write(tmp_path / "empty.txt", "")
    with pytest.raises(ConfigError, match="no UTF-8 text"):
        train_tokenizer(str(tmp_path / "*.txt"), 500, str(tmp_path / "t.model"))
    _write(tmp_path / "ok.txt", "hello world\n" * 10)
    with pytest.raises(ConfigError, match="vocab_size=100"):
        train_tokenizer(str(tmp_path / "*.txt"), 100, str(tmp_path / "t.model"))
    with pytest.raises(ConfigError, match="not found"):
        load_tokenizer(str(tmp_path / "nope.model"))


# ---------------------------------------------------------------------------------------------------------------
# Chunking and packing


@pytest.mark.parametrize("n", [1, 2, 5, 32, 33, 34, 64, 65, 100])
def test_chunking_keeps_every_target(n: int) -> None:
    tokens = np.arange(n, dtype=np.int32) + 10
    chunks = _ChunkDocument(32).flat_map(tokens)
    assert all(1 <= len(c["inputs"]) == len(c["targets"]) <= 32 for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c["targets"] for c in chunks] or [[]]), tokens[1:])
    np.testing.assert_array_equal(np.concatenate([c["inputs"] for c in chunks] or [[]]), tokens[:-1])


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_synthetic_batches_shapes_invariants_determinism(packing: str) -> None:
    cfg = _cfg(source="synthetic", packing=packing)
    a = _take(build_dataset(cfg, vocab_size=1000, batch_size=4, seed=1), 4)
    b = _take(build_dataset(cfg, vocab_size=1000, batch_size=4, seed=1), 4)
    c = _take(build_dataset(cfg, vocab_size=1000, batch_size=4, seed=2), 1)
    for x, y in zip(a, b):
        _check_invariants(x, 4, 32)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
        assert x["inputs"].max() < 1000
        assert pack_stats(x) > 0.8
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_synthetic_is_learnable() -> None:
    """A bigram rule (next = previous + 1..3) must predict a large share of targets; random ids would give ~5%."""
    src = SyntheticSource(vocab_size=32000, seq_len=64, seed=0)
    batch = _take(build_dataset(_cfg(source="synthetic", seq_len=64), vocab_size=32000, batch_size=16, seed=0), 1)[0]
    x, y = batch["inputs"].astype(np.int64), batch["targets"].astype(np.int64)
    body = (x >= NUM_RESERVED_IDS) & (y >= NUM_RESERVED_IDS)
    step = (y - x) % src.alphabet
    assert np.mean(np.isin(step[body], [1, 2, 3])) > 0.4
    assert batch["inputs"].max() < NUM_RESERVED_IDS + src.alphabet


# ---------------------------------------------------------------------------------------------------------------
# Text and JSONL sources


def _decoded_docs(batches: list[dict[str, np.ndarray]], tok_path: str) -> set[str]:
    """Whole short documents back as text: each is one packed segment [bos] + ids -> ids + [eos]."""
    tok = load_tokenizer(tok_path)
    out = set()
    for b in batches:
        for inputs, targets in _segments(b):
            assert inputs[0] == BOS_ID and targets[-1] == EOS_ID
            out.add(tok.decode(targets[:-1]))
    return out


def test_text_source_yields_every_utf8_file(tmp_path: Path, tok_path: str, caplog: pytest.LogCaptureFixture) -> None:
    for i, doc in enumerate(DOCS):
        _write(tmp_path / "docs" / f"{i:02d}.txt", doc)
    (tmp_path / "docs" / "bad.txt").write_bytes(b"\xc3\x28 not utf-8")
    cfg = _cfg(source="text", path=str(tmp_path / "docs" / "*.txt"), tokenizer=tok_path, seq_len=64)
    with caplog.at_level(logging.WARNING, logger="maxlm.data"):
        batches = _take(build_dataset(cfg, vocab_size=600, batch_size=8, seed=0), 3)
    warnings = [r.getMessage() for r in caplog.records if "bad.txt" in r.getMessage()]
    assert len(warnings) == 1 and "not UTF-8" in warnings[0] and "1 unusable text files skipped" in warnings[0]
    for b in batches:
        _check_invariants(b, 8, 64)
    assert _decoded_docs(batches, tok_path) == set(DOCS)


def test_long_document_is_split_without_losing_tokens(tmp_path: Path, tok_path: str) -> None:
    text = "".join(SOURCE_SNIPPETS) * 6
    _write(tmp_path / "long.py", text)
    tok = load_tokenizer(tok_path)
    tokens = np.asarray([BOS_ID] + tok.encode(text) + [EOS_ID], np.int32)
    assert len(tokens) > 5 * 32
    expected = {(tuple(c["inputs"]), tuple(c["targets"])) for c in _ChunkDocument(32).flat_map(tokens)}
    cfg = _cfg(source="text", path=str(tmp_path / "long.py"), tokenizer=tok_path, seq_len=32)
    batches = _take(build_dataset(cfg, vocab_size=600, batch_size=4, seed=0), 32)
    seen = {(tuple(i), tuple(t)) for b in batches for i, t in _segments(b)}
    assert seen == expected


def test_jsonl_source_skips_bad_lines_with_warning(tmp_path: Path, tok_path: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[:10])]
    lines[3:3] = ["{not json", json.dumps({"body": "no text field"}), "", json.dumps({"text": 7})]
    path = _write(tmp_path / "a.jsonl", "\n".join(lines) + "\n")
    cfg = _cfg(source="jsonl", path=str(path), tokenizer=tok_path, seq_len=64, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="maxlm.data"):
        batches = _take(build_dataset(cfg, vocab_size=600, batch_size=8, seed=0), 2)
    with pytest.raises(ConfigError, match=r"3 of 13 sampled items .* > data.max_bad_fraction=0.1"):
        build_dataset(_cfg(source="jsonl", path=str(path), tokenizer=tok_path), vocab_size=600, batch_size=8, seed=0)
    assert _decoded_docs(batches, tok_path) == set(DOCS[:10])
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert f"{path}:4: invalid JSON" in msgs and f"{path}:5: no string field 'text'" in msgs
    assert f"{path}:7: no string field" in msgs and f"{path}:6" not in msgs  # blank line 6 is not an error


def test_max_files_caps_the_sorted_file_list(tmp_path: Path, tok_path: str) -> None:
    for i, doc in enumerate(DOCS[:6]):
        _write(tmp_path / f"{i}.txt", doc)
    cfg = _cfg(source="text", path=str(tmp_path / "*.txt"), tokenizer=tok_path, seq_len=64, max_files=2)
    assert _decoded_docs(_take(build_dataset(cfg, vocab_size=600, batch_size=4, seed=0), 2), tok_path) == set(DOCS[:2])


# ---------------------------------------------------------------------------------------------------------------
# Sharding and resumption


@pytest.mark.parametrize("source", ["text", "jsonl"])
def test_shards_are_disjoint_and_cover_the_corpus(tmp_path: Path, tok_path: str, source: str) -> None:
    if source == "text":
        for i, doc in enumerate(DOCS):
            _write(tmp_path / f"{i:02d}.txt", doc)
        path = str(tmp_path / "*.txt")
    else:
        path = str(_write(tmp_path / "d.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS)))
    cfg = _cfg(source=source, path=path, tokenizer=tok_path, seq_len=64)
    got = [_decoded_docs(_take(build_dataset(cfg, vocab_size=600, batch_size=4, seed=0, shard_index=i,
                                             shard_count=2), 3), tok_path) for i in range(2)]
    assert got[0] and got[1] and not got[0] & got[1]
    assert got[0] | got[1] == set(DOCS)


@pytest.mark.parametrize("source", ["synthetic", "text"])
def test_iterator_state_resumes_exactly(tmp_path: Path, tok_path: str, source: str) -> None:
    _write(tmp_path / "a.py", "".join(SOURCE_SNIPPETS) * 3)
    for i, doc in enumerate(DOCS):
        _write(tmp_path / f"{i:02d}.py", doc)
    cfg = _cfg(source=source, path=str(tmp_path / "*.py"), tokenizer=tok_path)
    it = iter(build_dataset(cfg, vocab_size=600, batch_size=4, seed=3))
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(6)]
    resumed = iter(build_dataset(cfg, vocab_size=600, batch_size=4, seed=3))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(got[k], want[k])


# ---------------------------------------------------------------------------------------------------------------
# Errors, raised when the dataset is built


def test_config_errors(tmp_path: Path, tok_path: str) -> None:
    def build(**kw: object) -> None:
        build_dataset(_cfg(**kw), vocab_size=600, batch_size=2, seed=0)

    with pytest.raises(ConfigError, match="data.path: no files match"):
        build(source="text", path=str(tmp_path / "nothing" / "*.txt"), tokenizer=tok_path)
    _write(tmp_path / "empty" / "a.txt", "")
    (tmp_path / "empty" / "b.txt").write_bytes(b"\xff\xff")
    with pytest.raises(ConfigError, match=r"^data\.path: .* no documents"):
        build(source="text", path=str(tmp_path / "empty" / "*"), tokenizer=tok_path)
    _write(tmp_path / "bad.jsonl", "{oops\n\n" + json.dumps({"other": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"^data\.path: .* no documents"):
        build(source="jsonl", path=str(tmp_path / "bad.jsonl"), tokenizer=tok_path)
    _write(tmp_path / "one" / "a.txt", "just one file")
    with pytest.raises(ConfigError, match="fewer than the 2 data shards"):
        build_dataset(_cfg(source="text", path=str(tmp_path / "one" / "*"), tokenizer=tok_path), vocab_size=600,
                      batch_size=2, seed=0, shard_index=1, shard_count=2)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build(source="text", path=str(tmp_path / "one" / "*"), tokenizer="")
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_dataset(_cfg(source="text", path=str(tmp_path / "one" / "*"), tokenizer=tok_path), vocab_size=300,
                      batch_size=2, seed=0)


def test_multiprocess_prefetch_matches_in_process() -> None:
    """One grain worker process sees the whole (un-sliced) stream, so it must reproduce the in-process batches."""
    cfg = _cfg(source="synthetic")
    want = _take(build_dataset(cfg, vocab_size=600, batch_size=4, seed=0), 3)
    cfg.num_workers = 1
    it = iter(build_dataset(cfg, vocab_size=600, batch_size=4, seed=0))
    try:
        got = [next(it) for _ in range(3)]
    finally:
        it.close()  # type: ignore[attr-defined]
    for w, g in zip(want, got):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(g[k], w[k])
