"""Random-access document sources for the grain pipeline: text files, JSONL lines, and synthetic sequences.

Every source is a plain sequence (`__len__` + `__getitem__`) of documents, which is what `grain.MapDataset.source`
needs: random access is what makes a global shuffle, per-host sharding (`ds[shard::count]`) and exact iterator
resumption (state = an index) cheap. Documents are read lazily; a document that cannot be used comes back as
`None` (with a logged warning) so one bad file never stops a run.
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np

from maxlm.config import ConfigError, DataConfig, expand_globs

log = logging.getLogger(__name__)

# Token ids below this are reserved for pad/unk/bos/eos (see maxlm.data.tokenizer), so synthetic data avoids them.
NUM_RESERVED_IDS = 4
# Synthetic tokens come from at most this many ids: a small alphabet lets a tiny model learn the unigram and bigram
# structure within tens of steps even when the model vocabulary is 32k (10.4 -> ~4 nats in 50 AdamW steps at lr 1e-2
# for a bigram model; with 512 ids it only reaches ~6.6). See SyntheticSource.
SYNTHETIC_MAX_ALPHABET = 64
# Effectively infinite (more documents than any run reads); `repeat()` wraps around after it anyway.
SYNTHETIC_NUM_DOCS = 2**31 - 1
_SCAN_BLOCK = 64 << 20


def list_files(data: DataConfig) -> list[str]:
    """The sorted file list behind `data.path`, capped at `data.max_files`; raises ConfigError when empty."""
    files = expand_globs(data.path)
    if not files:
        raise ConfigError(f"data.path: no files match {data.path!r}; check the path or glob")
    if data.max_files > 0:
        files = files[: data.max_files]
    return files


class _WarnOnce:
    """Counts skipped items and warns once per item, so a bad file is not re-reported every epoch."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._seen: set[object] = set()
        self._lock = threading.Lock()  # grain reads elements from several threads

    def __call__(self, key: object, message: str) -> None:
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            count = len(self._seen)
        log.warning("%s (%d %s skipped so far)", message, count, self._what)

    def __getstate__(self) -> dict[str, object]:
        return {"what": self._what}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["what"])  # type: ignore[misc, arg-type]


class TextFileSource:
    """Each file is one document (a source file, a book, a web page): its whole text as a `str`."""

    def __init__(self, files: list[str]) -> None:
        self.files = list(files)
        self._warn = _WarnOnce("non-UTF-8 files")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> str | None:
        path = self.files[index]
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            self._warn(path, f"data: skipping {path}: not UTF-8 (byte {e.start})")
        except OSError as e:
            self._warn(path, f"data: skipping {path}: {e.strerror}")
        return None

    def describe(self, index: int) -> str:
        return self.files[index]


def _line_spans(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte [start, end) and 1-based line number of every non-empty line, from one vectorised newline scan."""
    found, size = [np.zeros(0, np.int64)], 0
    with open(path, "rb") as f:
        while block := f.read(_SCAN_BLOCK):  # blockwise, so a 100 GB file needs no 100 GB mask
            found.append(np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10).astype(np.int64) + size)
            size += len(block)
    newlines = np.concatenate(found)
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [size]])
    line_nos = np.arange(1, len(starts) + 1, dtype=np.int64)
    keep = ends > starts  # drops blank lines and the empty "line" after a trailing newline
    return starts[keep], ends[keep], line_nos[keep]


class JsonlSource:
    """Each line of each JSONL file is one document, its text in `text_field`.

    The constructor indexes line offsets of every file (one sequential scan) so that documents, not files, are the
    unit of shuffling and sharding: a corpus that is a single large JSONL file still spreads over all hosts.
    """

    def __init__(self, files: list[str], text_field: str) -> None:
        self.files = list(files)
        self.text_field = text_field
        spans = [_line_spans(path) for path in self.files]
        empty = np.zeros(0, np.int64)
        self._file_ids = np.concatenate([np.full(len(s), i, np.int32) for i, (s, _, _) in enumerate(spans)] or [empty])
        self._starts = np.concatenate([s for s, _, _ in spans] or [empty])
        self._ends = np.concatenate([e for _, e, _ in spans] or [empty])
        self._line_nos = np.concatenate([n for _, _, n in spans] or [empty])
        self._warn = _WarnOnce("bad JSONL lines")

    def __len__(self) -> int:
        return len(self._starts)

    def describe(self, index: int) -> str:
        return f"{self.files[self._file_ids[index]]}:{self._line_nos[index]}"

    def __getitem__(self, index: int) -> str | None:
        path = self.files[self._file_ids[index]]
        start, end = int(self._starts[index]), int(self._ends[index])
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        if not raw.strip():
            return None  # blank line: not a document, not an error
        where = f"{path}:{self._line_nos[index]}"
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._warn(where, f"data: skipping {where}: invalid JSON ({e})")
            return None
        if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
            self._warn(where, f"data: skipping {where}: no string field {self.text_field!r}")
            return None
        return record[self.text_field]


class SyntheticSource:
    """An endless, deterministic stream of learnable token sequences (no files, no tokenizer).

    Half the documents are arithmetic progressions with a step of 1..3 (so the previous token narrows the next to
    three choices: a bigram a tiny model learns in tens of steps), half are a random 2..8-gram repeated (learnable
    only in context, by copying). Tokens come from an alphabet of at most SYNTHETIC_MAX_ALPHABET ids just above the
    reserved ones. Document `i` depends only on (seed, i), which makes shuffling unnecessary and sharding and
    resumption exact.
    """

    def __init__(self, vocab_size: int, seq_len: int, seed: int) -> None:
        if vocab_size < NUM_RESERVED_IDS + 8:
            raise ConfigError(f"model.vocab_size={vocab_size} is too small for synthetic data; need at least "
                              f"{NUM_RESERVED_IDS + 8} (ids 0-{NUM_RESERVED_IDS - 1} are reserved)")
        self.alphabet = min(vocab_size - NUM_RESERVED_IDS, SYNTHETIC_MAX_ALPHABET)
        self.seq_len = seq_len
        self.seed = seed

    def __len__(self) -> int:
        return SYNTHETIC_NUM_DOCS

    def describe(self, index: int) -> str:
        return f"synthetic[{index}]"

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        n = int(rng.integers(16, 2 * self.seq_len + 1))
        if rng.random() < 0.5:
            start, step = rng.integers(self.alphabet), rng.integers(1, 4)
            body = (start + step * np.arange(n)) % self.alphabet
        else:
            gram = rng.integers(self.alphabet, size=int(rng.integers(2, 9)))
            body = np.resize(gram, n)
        return (body + NUM_RESERVED_IDS).astype(np.int32)
