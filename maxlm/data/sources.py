"""Random-access document sources: text files, JSONL lines, synthetic sequences (Parquet and ArrayRecord: records.py).

Every source is a plain sequence (`__len__` + `__getitem__`) of documents, which is what `grain.MapDataset.source`
needs: random access is what makes a global shuffle, per-host sharding (`ds[shard::count]`) and exact iterator
resumption (state = an index) cheap. Documents are read lazily; one that cannot be used (malformed JSON, a missing
field, bytes that are not UTF-8, an empty file) comes back as `None` with a warning naming the file and line, and
is counted in `bad_count`, so one bad file never stops a run but a corpus that is mostly bad does (see
`maxlm.data.pipeline` and `maxlm.data.prepare`, which compare the count with `data.max_bad_fraction`).

Sources also take *pieces* (a byte range of a JSONL file, a row-group range of a Parquet file, a record range of an
ArrayRecord file), which is how `maxlm data prepare` splits one large file over several worker processes.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import numpy as np

from maxlm.config import ConfigError
from maxlm.data.items import DocumentSource, Piece, WarnOnce, decode_utf8

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
# Blank-line document separators: a newline, then one or more lines holding only whitespace.
_PARAGRAPH_BREAK = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")



class TextFileSource:
    """Each file is one document (a source file, a book, a web page): its whole text as a `str`."""

    static_bad = 0

    def __init__(self, files: list[str]) -> None:
        self.files = list(files)
        self._warn = WarnOnce("unusable text files")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def bad_count(self) -> int:
        return self._warn.count

    def __getitem__(self, index: int) -> str | None:
        path = self.files[index]
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            self._warn(path, f"data: skipping {path}: {e.strerror}")
            return None
        if not raw:
            self._warn(path, f"data: skipping {path}: empty file")
            return None
        return decode_utf8(raw, path, self._warn)

    def describe(self, index: int) -> str:
        return self.files[index]


class _SpanSource:
    """Documents that are byte spans inside files, indexed once by the subclass's constructor (which sets
    `files`, `_warn`, `_file_ids`, `_starts`, `_ends`, `_line_nos`); each document is read on its own."""

    files: list[str]
    _warn: WarnOnce
    _file_ids: np.ndarray
    _starts: np.ndarray
    _ends: np.ndarray
    _line_nos: np.ndarray

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def bad_count(self) -> int:
        return self._warn.count

    def describe(self, index: int) -> str:
        return f"{self.files[self._file_ids[index]]}:{self._line_nos[index]}"

    def _read_span(self, index: int) -> bytes:
        start, end = int(self._starts[index]), int(self._ends[index])
        with open(self.files[self._file_ids[index]], "rb") as f:
            f.seek(start)
            return f.read(end - start)


class ParagraphSource(_SpanSource):
    """Text files as blank-line-separated documents (one paragraph, article or record per block).

    The constructor reads every file once to index the byte span and first line of each block; documents are then
    read and decoded individually, so a block with bad bytes is skipped without losing the rest of its file.
    """

    def __init__(self, files: list[str]) -> None:
        self.files = list(files)
        self._warn = WarnOnce("unusable text blocks")
        file_ids, starts, ends, lines = [], [], [], []
        for i, path in enumerate(self.files):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                self._warn(path, f"data: skipping {path}: {e.strerror}")
                continue
            if not data.strip():
                self._warn(path, f"data: skipping {path}: empty file")
                continue
            pos, line = 0, 1
            for m in list(_PARAGRAPH_BREAK.finditer(data)) + [None]:
                end = m.start() if m else len(data)
                if data[pos:end].strip():
                    file_ids.append(i), starts.append(pos), ends.append(end), lines.append(line)
                if m:
                    line += data.count(b"\n", pos, m.end())
                    pos = m.end()
        self.static_bad = self._warn.count
        self._file_ids = np.asarray(file_ids, np.int32)
        self._starts = np.asarray(starts, np.int64)
        self._ends = np.asarray(ends, np.int64)
        self._line_nos = np.asarray(lines, np.int64)

    def __getitem__(self, index: int) -> str | None:
        return decode_utf8(self._read_span(index), self.describe(index), self._warn)


def _line_spans(path: str, lo: int = 0, hi: int = -1, line0: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte [start, end) and 1-based line number of every non-empty line in bytes [lo, hi) of a file (`lo` must
    be a line start), from one vectorised newline scan."""
    found, size = [np.zeros(0, np.int64)], lo
    with open(path, "rb") as f:
        f.seek(lo)
        remaining = -1 if hi < 0 else hi - lo
        while remaining != 0:
            block = f.read(_SCAN_BLOCK if remaining < 0 else min(_SCAN_BLOCK, remaining))
            if not block:
                break
            found.append(np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10).astype(np.int64) + size)
            size += len(block)
            remaining = remaining - len(block) if remaining > 0 else remaining
    newlines = np.concatenate(found)
    starts = np.concatenate([[lo], newlines + 1])
    ends = np.concatenate([newlines, [size]])
    line_nos = np.arange(line0, line0 + len(starts), dtype=np.int64)
    keep = ends > starts  # drops blank lines and the empty "line" after a trailing newline
    return starts[keep], ends[keep], line_nos[keep]


def split_lines(path: str, target_bytes: int) -> list[Piece]:
    """Cuts a line-oriented file into pieces of about `target_bytes`, each starting at a line start.

    One sequential pass counts newlines so every piece knows its first line number (warnings name file:line).
    """
    pieces: list[Piece] = []
    lo, line0, pos, line = 0, 1, 0, 1
    with open(path, "rb") as f:
        while block := f.read(_SCAN_BLOCK):
            nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            # cut after the first newline past each multiple of target_bytes from the current piece start
            while True:
                want = lo + target_bytes
                k = int(np.searchsorted(nl, want - pos))
                if k >= len(nl):
                    break
                cut = pos + int(nl[k]) + 1
                pieces.append(Piece(path, lo, cut, line0))
                line0 = line + k + 1
                lo = cut
            line += len(nl)
            pos += len(block)
    if pos > lo or not pieces:
        pieces.append(Piece(path, lo, pos, line0))
    return pieces


class JsonlSource(_SpanSource):
    """Each line of each JSONL file is one document, its text in `text_field`.

    The constructor indexes line offsets of every file (one sequential scan) so that documents, not files, are the
    unit of shuffling and sharding: a corpus that is a single large JSONL file still spreads over all hosts.
    """

    def __init__(self, files: list[str] | list[Piece], text_field: str | None) -> None:
        """`text_field=None`: each document is the whole record (a dict), for SFT rows (maxlm.data.sft)."""
        pieces = [p if isinstance(p, Piece) else Piece(p) for p in files]
        self.files = [p.path for p in pieces]
        self.text_field = text_field
        self._warn = WarnOnce("bad JSONL lines")
        spans = []
        for p in pieces:
            s = _line_spans(p.path, p.lo, p.hi, p.line0)
            if not len(s[0]) and p.lo == 0:
                self._warn(p.path, f"data: skipping {p.path}: empty file")
            spans.append(s)
        self.static_bad = self._warn.count
        empty = np.zeros(0, np.int64)
        self._file_ids = np.concatenate([np.full(len(s), i, np.int32) for i, (s, _, _) in enumerate(spans)] or [empty])
        self._starts = np.concatenate([s for s, _, _ in spans] or [empty])
        self._ends = np.concatenate([e for _, e, _ in spans] or [empty])
        self._line_nos = np.concatenate([n for _, _, n in spans] or [empty])

    def __getitem__(self, index: int) -> str | dict[str, Any] | None:
        raw = self._read_span(index)
        if not raw.strip():
            return None  # blank line: not a document, not an error
        where = self.describe(index)
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as e:
            self._warn(where, f"data: skipping {where}: not UTF-8 ({e.reason} at byte {e.start})")
            return None
        except json.JSONDecodeError as e:
            self._warn(where, f"data: skipping {where}: invalid JSON ({e})")
            return None
        if self.text_field is None:
            if isinstance(record, dict):
                return record
            self._warn(where, f"data: skipping {where}: a JSON {type(record).__name__}, expected an object")
            return None
        if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
            self._warn(where, f"data: skipping {where}: no string field {self.text_field!r}")
            return None
        return record[self.text_field]


def open_source(fmt: str, pieces: list[str] | list[Piece], *, text_field: str = "text",
                text_split: str = "file") -> DocumentSource:
    """The document source of one format over files (or pieces of files)."""
    paths = [p.path if isinstance(p, Piece) else p for p in pieces]
    if fmt == "text":
        return ParagraphSource(paths) if text_split == "blank_line" else TextFileSource(paths)
    if fmt == "jsonl":
        return JsonlSource(pieces, text_field)
    if fmt == "parquet":
        from maxlm.data.records import ParquetSource

        return ParquetSource(pieces, text_field)
    if fmt == "arrayrecord":
        from maxlm.data.records import ArrayRecordSource

        return ArrayRecordSource(pieces)
    raise ConfigError(f"data: format {fmt!r} has no file source (one of text, jsonl, parquet, arrayrecord)")


class SyntheticSource:
    """An endless, deterministic stream of learnable token sequences (no files, no tokenizer).

    Half the documents are arithmetic progressions with a step of 1..3 (so the previous token narrows the next to
    three choices: a bigram a tiny model learns in tens of steps), half are a random 2..8-gram repeated (learnable
    only in context, by copying). Tokens come from an alphabet of at most SYNTHETIC_MAX_ALPHABET ids just above the
    reserved ones. Document `i` depends only on (seed, i), which makes shuffling unnecessary and sharding and
    resumption exact.
    """

    bad_count = 0
    static_bad = 0

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
