"""Random-access document sources over binary record formats: Parquet rows and ArrayRecord records.

Same contract as maxlm.data.sources (a sequence of `str | None` documents with `describe`, `bad_count` and
`static_bad`); kept apart because these formats are opened through their own libraries (pyarrow, array_record),
with per-thread readers that must not be pickled into grain worker processes.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from maxlm.data.items import Piece, WarnOnce, decode_utf8


class _SegmentedSource:
    """Shared by the record sources: documents are numbered across segments (row groups, record spans) of known
    sizes, and each thread keeps its own open readers, which are not pickled into grain worker processes."""

    _warn: WarnOnce

    def _index_segments(self, sizes: list[int]) -> None:
        """Call at the end of __init__, once every file was opened (or skipped with a warning)."""
        self.static_bad = self._warn.count
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._local = threading.local()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def bad_count(self) -> int:
        return self._warn.count

    def _segment(self, index: int) -> tuple[int, int]:
        """(segment, position inside it) of document `index`."""
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return k, index - int(self._offsets[k])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_local")  # open files and decoded data stay with their thread
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


class ParquetSource(_SegmentedSource):
    """Each row of each Parquet file is one document, its text in column `text_field`.

    Parquet is read a row group at a time; each reader thread keeps the last row groups it decoded, so sequential
    reads (the cache builder) cost one decode per row group. Shuffled reads straight from Parquet decode a row
    group per document: prepare a cache (`maxlm data prepare`) for training at speed.
    """

    _CACHED_GROUPS = 2

    def __init__(self, files: list[str] | list[Piece], text_field: str | None) -> None:
        """`text_field=None`: each document is the whole row as a dict, for SFT rows (maxlm.data.sft)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        pieces = [p if isinstance(p, Piece) else Piece(p) for p in files]
        self.files = [p.path for p in pieces]
        self.text_field = text_field
        self._warn = WarnOnce("bad Parquet files or rows")
        # one entry per row group read: (file index, row group, first global row)
        groups: list[tuple[int, int]] = []
        sizes: list[int] = []
        for i, p in enumerate(pieces):
            try:
                meta = pq.ParquetFile(p.path)
            except (OSError, pa.ArrowException) as e:
                self._warn(p.path, f"data: skipping {p.path}: not a readable Parquet file ({e})")
                continue
            schema = meta.schema_arrow
            if text_field is not None and (schema.get_field_index(text_field) < 0 or not (
                    pa.types.is_string(schema.field(text_field).type)
                    or pa.types.is_large_string(schema.field(text_field).type))):
                self._warn(p.path, f"data: skipping {p.path}: no string column {text_field!r} "
                                   f"(columns: {', '.join(schema.names)})", items=max(1, meta.metadata.num_rows))
                continue
            hi = meta.metadata.num_row_groups if p.hi < 0 else p.hi
            if meta.metadata.num_rows == 0:
                self._warn(p.path, f"data: skipping {p.path}: empty file")
            for g in range(p.lo, hi):
                groups.append((i, g))
                sizes.append(meta.metadata.row_group(g).num_rows)
        self._groups = groups
        self._index_segments(sizes)

    def _locate(self, index: int) -> tuple[int, int, int]:
        k, r = self._segment(index)
        fi, g = self._groups[k]
        return fi, g, r

    def describe(self, index: int) -> str:
        fi, g, r = self._locate(index)
        return f"{self.files[fi]}: row group {g} row {r}"

    def _column(self, fi: int, g: int) -> list[Any]:
        import pyarrow.parquet as pq

        cache = getattr(self._local, "groups", None)
        if cache is None:
            cache = self._local.groups = {}
            self._local.files = {}
        key = (fi, g)
        if key not in cache:
            pf = self._local.files.get(fi)
            if pf is None:
                pf = self._local.files[fi] = pq.ParquetFile(self.files[fi])
            if len(cache) >= self._CACHED_GROUPS:
                cache.pop(next(iter(cache)))
            if self.text_field is None:
                cache[key] = pf.read_row_group(g).to_pylist()
            else:
                cache[key] = pf.read_row_group(g, columns=[self.text_field]).column(0).to_pylist()
        return cache[key]

    def __getitem__(self, index: int) -> str | dict[str, Any] | None:
        fi, g, r = self._locate(index)
        value = self._column(fi, g)[r]
        if self.text_field is None:
            return value
        if not isinstance(value, str):
            where = f"{self.files[fi]}: row group {g} row {r}"
            self._warn(where, f"data: skipping {where}: {self.text_field!r} is null")
            return None
        return value


class ArrayRecordSource(_SegmentedSource):
    """Each record of each ArrayRecord file is one document: its UTF-8 text."""

    def __init__(self, files: list[str] | list[Piece]) -> None:
        pieces = [p if isinstance(p, Piece) else Piece(p) for p in files]
        self.files = [p.path for p in pieces]
        self._warn = WarnOnce("bad ArrayRecord records")
        spans: list[tuple[int, int, int]] = []  # (file index, first record, count)
        for i, p in enumerate(pieces):
            n = num_records(p.path)
            if n is None:
                self._warn(p.path, f"data: skipping {p.path}: not a readable ArrayRecord file")
                continue
            if n == 0:
                self._warn(p.path, f"data: skipping {p.path}: empty file")
            hi = n if p.hi < 0 else min(p.hi, n)
            if hi > p.lo:
                spans.append((i, p.lo, hi - p.lo))
        self._spans = spans
        self._index_segments([c for _, _, c in spans])

    def _locate(self, index: int) -> tuple[int, int]:
        k, r = self._segment(index)
        fi, first, _ = self._spans[k]
        return fi, first + r

    def describe(self, index: int) -> str:
        fi, r = self._locate(index)
        return f"{self.files[fi]}:record {r}"

    def __getitem__(self, index: int) -> str | None:
        from array_record.python.array_record_module import ArrayRecordReader

        fi, r = self._locate(index)
        readers = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = {}
        reader = readers.get(fi)
        if reader is None:
            reader = readers[fi] = ArrayRecordReader(self.files[fi], "readahead_buffer_size:0,max_parallelism:0")
        raw = reader.read([r])[0]
        return decode_utf8(raw, f"{self.files[fi]}:record {r}", self._warn)


def num_records(path: str) -> int | None:
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path, "readahead_buffer_size:0,max_parallelism:0")
    except (RuntimeError, ValueError, OSError):
        return None
    try:
        return int(reader.num_records())
    finally:
        reader.close()
