"""Per-document decisions shared by the cache builder and the on-the-fly pipeline: content hash, held-out split,
quality filters.

Both paths make the same decision for the same text, so a model trained from the cache and one trained from the
raw files see the same train/eval split and the same filtered corpus (the cache additionally removes exact
duplicates, which needs a global view of all hashes).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from maxlm.config import DataConfig

# Characters that do not occur in text: C0/C1 control codes other than tab, newline, carriage return and form
# feed, DEL, lone surrogates, the replacement character U+FFFD (what a lossy decode leaves behind) and the
# non-characters U+FFFE/U+FFFF. A document made mostly of them is binary that happened to decode.
_NON_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffd\ufffe\uffff]")

# Filter reasons, in the order they are checked (also the keys of the counts that prepare reports).
FILTER_REASONS = ("too_short", "too_long", "non_text")


def document_hash(text: str) -> int:
    """64-bit content hash of a document's UTF-8 bytes (BLAKE2b): the key of exact dedup and of the split.

    A cryptographic hash rather than Python's `hash` because it must be identical across processes, machines and
    runs (Python salts str hashes per process). 64 bits: the chance of any collision among 10^8 documents is ~3e-4.
    """
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def is_eval(doc_hash: int, eval_fraction: float) -> bool:
    """Held-out documents are those whose hash falls in the lowest `eval_fraction` of the 64-bit range.

    Deciding by content (not by position in a file list) keeps the split stable when files are added, reordered or
    resharded, and puts every copy of a duplicated document on the same side, so eval never leaks into training.
    """
    return doc_hash < eval_threshold(eval_fraction)


def eval_threshold(eval_fraction: float) -> int:
    """Hashes below this are held out (one integer, so the numpy path in the cache decides identically)."""
    return min(int(eval_fraction * 2.0**64), 2**64 - 1)


@dataclass(frozen=True)
class Filters:
    """The quality filters of `data.*` (all off by default)."""

    min_chars: int = 0
    max_chars: int = 0  # 0: no limit
    max_non_text_ratio: float = 1.0  # 1.0: off

    @classmethod
    def from_config(cls, data: DataConfig) -> "Filters":
        return cls(data.min_doc_chars, data.max_doc_chars, data.max_non_text_ratio)

    @property
    def active(self) -> bool:
        return self.min_chars > 0 or self.max_chars > 0 or self.max_non_text_ratio < 1.0

    def reject(self, text: str) -> str | None:
        """The reason to drop `text` (one of FILTER_REASONS), or None to keep it."""
        n = len(text)
        if n < self.min_chars:
            return "too_short"
        if self.max_chars and n > self.max_chars:
            return "too_long"
        if self.max_non_text_ratio < 1.0 and n and non_text_ratio(text) > self.max_non_text_ratio:
            return "non_text"
        return None


def non_text_ratio(text: str) -> float:
    """Fraction of characters that are control codes, surrogates or U+FFFD (see _NON_TEXT)."""
    if not text:
        return 0.0
    return len(_NON_TEXT.findall(text)) / len(text)
