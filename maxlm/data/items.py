"""What every document source shares: the source protocol, file pieces, glob listing, and counting bad items.

`maxlm.data.sources` (text, JSONL, synthetic) and `maxlm.data.records` (Parquet, ArrayRecord) both build on it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from maxlm.config import ConfigError, expand_globs

log = logging.getLogger("maxlm.data.sources")

# Warnings per source object about skipped items; the rest are only counted (reported by `maxlm data prepare`).
MAX_WARNINGS = 5


class DocumentSource(Protocol):
    """What the pipeline and the cache builder need from a source."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def describe(self, index: int) -> str: ...

    @property
    def bad_count(self) -> int: ...

    static_bad: int  # items rejected while indexing (empty or unreadable files), included in bad_count


@dataclass(frozen=True)
class Piece:
    """A part of one input file: JSONL byte range [lo, hi) starting at line `line0`; Parquet row groups [lo, hi);
    ArrayRecord records [lo, hi). `hi < 0` means to the end; text files are always whole (lo = hi = 0)."""

    path: str
    lo: int = 0
    hi: int = -1
    line0: int = 1


def list_files(path: str, max_files: int = 0, key: str = "data.path") -> list[str]:
    """The sorted file list behind a glob, capped at `max_files`; raises ConfigError when empty."""
    files = expand_globs(path)
    if not files:
        raise ConfigError(f"{key}: no files match {path!r}; check the path or glob")
    if max_files > 0:
        files = files[:max_files]
    return files


class WarnOnce:
    """Counts skipped items and warns once per item, so a bad file is not re-reported every epoch."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._seen: set[object] = set()
        self._items = 0
        self._lock = threading.Lock()  # grain reads elements from several threads

    def __call__(self, key: object, message: str, items: int = 1) -> None:
        """Records `items` bad items under `key` (a file, or file:line) and warns the first time `key` is seen,
        up to MAX_WARNINGS times per source (a corpus with thousands of empty files would bury everything else)."""
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            self._items += items
            count, n = self._items, len(self._seen)
        if n <= MAX_WARNINGS:
            more = "; further ones are counted without a warning" if n == MAX_WARNINGS else ""
            log.warning("%s (%d %s skipped so far%s)", message, count, self._what, more)

    @property
    def count(self) -> int:
        """Bad items so far (a file rejected whole counts its rows)."""
        return self._items

    def __getstate__(self) -> dict[str, object]:
        return {"what": self._what}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["what"])  # type: ignore[misc, arg-type]


def decode_utf8(raw: bytes, where: str, warn: WarnOnce) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        warn(where, f"data: skipping {where}: not UTF-8 (byte {e.start})")
        return None
    return text


def source_key(comp: Any, mixture: bool) -> str:
    """The config key that names a source's files, for messages: `data.path` or `data.mixture (NAME).path`."""
    return f"data.mixture ({comp.name}).path" if mixture else "data.path"


def component_files(comp: Any, mixture: bool) -> list[str] | None:
    """The files of one data source (a `MixtureComponent`). A source of a mixture that matches nothing is skipped
    with a warning (None); the single source of `data.path` must match (ConfigError)."""
    try:
        return list_files(comp.path, comp.max_files, source_key(comp, mixture))
    except ConfigError as e:
        if not mixture:
            raise
        log.warning("data: skipping source %s: %s", comp.name, e)
        return None
