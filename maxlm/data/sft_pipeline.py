"""The SFT stages of the grain pipeline: rows -> checked examples -> (ids, trained-token weights) -> packable examples.

maxlm.data.pipeline runs the same mixture, packing, batching and DataStream for SFT as for pretraining; this module
supplies what differs per component when `data.example_format` is not `text`:
  * the rows: JSONL lines or Parquet rows as whole records (with file:line for warnings);
  * `SftEncoder`: row -> maxlm.data.sft example (checked, rendered, tokenized once, truncated per
    data.truncation) -> {"inputs", "targets", "targets_weights"}, or a skip (bad row, dropped example) that is
    counted, never trained on;
  * `_CarryEvents`: skips and truncations travel as per-token `event_*` features on the next example (a count at
    position 0), so packing and batching carry them to maxlm.data.stream, which sums them into the run's
    `data_bad`, `data_dropped` and `data_truncated` and keeps the sums in the iterator state (exact on resume,
    correct with grain worker processes);
  * `check_sft_rows`: the build-time check of a sample (bad fraction, a template without assistant spans).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from maxlm.config import ConfigError, DataConfig
from maxlm.data.chat_template import ChatTemplate
from maxlm.data.clean import document_hash, eval_threshold
from maxlm.data.sft import BadRow, Encoded, Fields, NoAssistantSpan, encode_example, fit_to_length, parse_row
from maxlm.data.items import WarnOnce, component_files, source_key
from maxlm.data.sources import open_source

log = logging.getLogger(__name__)

EVENTS = ("bad", "dropped", "truncated")  # counters an SFT stream reports (see maxlm.data.stream)
EVENT_KEYS = tuple(f"event_{e}" for e in EVENTS)


def row_hash(record: Any) -> int:
    """The content hash that places a row in the held-out split (data.eval_fraction), as documents are placed."""
    return document_hash(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str))


def is_held_out(record: Any, eval_fraction: float) -> bool:
    """Whether a row belongs to the eval split of data.eval_fraction."""
    return eval_fraction > 0 and row_hash(record) < eval_threshold(eval_fraction)


class Rows:
    """A record source as (record or None, "file:line") pairs, so a bad row's warning names where it is."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        return self.source[index], self.source.describe(index)


@dataclass
class EncodeResult:
    """One row's outcome: `example` (None when skipped) and which counter it moves (None for a row of the other
    split, which is neither trained on nor counted)."""

    example: Encoded | None
    event: str | None
    truncated: bool = False


class SftEncoder:
    """Row -> example for one mixture component (picklable: grain worker processes get a copy)."""

    def __init__(self, tokenizer: Any, template: ChatTemplate | None, fmt: str, fields: Fields, data: DataConfig,
                 split: str = "train") -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.fmt = fmt
        self.fields = fields
        self.loss_on = data.loss_on
        self.add_bos = data.add_bos
        self.max_tokens = data.seq_len + 1  # inputs and targets are the ids shifted by one
        self.truncation = data.truncation
        self.want_eval = split == "eval"
        self.threshold = eval_threshold(data.eval_fraction) if data.eval_fraction > 0 else 0
        self._warn = WarnOnce("bad SFT rows")

    def in_split(self, record: Any) -> bool:
        if not (self.threshold or self.want_eval):
            return True
        return (row_hash(record) < self.threshold) == self.want_eval

    def encode(self, record: Any, where: str) -> EncodeResult:
        """Parses, renders, tokenizes and fits one row; NoAssistantSpan propagates (the caller decides whether
        it is one bad row or a broken template)."""
        if record is None:  # unreadable: the source already warned with file:line
            return EncodeResult(None, "bad")
        if not self.in_split(record):
            return EncodeResult(None, None)
        try:
            enc = encode_example(parse_row(record, self.fmt, self.fields), self.tokenizer, self.template,
                                 self.loss_on, self.add_bos)
        except NoAssistantSpan:
            raise
        except BadRow as e:
            self._warn(where, f"data: skipping {where}: {e}")
            return EncodeResult(None, "bad")
        fitted, truncated = fit_to_length(enc, self.max_tokens, self.truncation)
        if fitted is None or len(fitted) < 2 or not fitted.mask[1:].any():
            return EncodeResult(None, "dropped")  # over-long (drop) or no trained target left
        return EncodeResult(fitted, "truncated" if truncated else None, truncated)

    def __call__(self, item: tuple[Any, str]) -> dict[str, np.ndarray]:
        record, where = item
        try:
            result = self.encode(record, where)
        except NoAssistantSpan as e:
            self._warn(where, f"data: skipping {where}: {e}")
            result = EncodeResult(None, "bad")
        if result.example is None:
            return {"skip": np.asarray([result.event == e for e in EVENTS], np.int32)}
        ids, mask = result.example.ids, result.example.mask
        return {"inputs": ids[:-1], "targets": ids[1:], "targets_weights": mask[1:].astype(np.float32),
                "truncated": np.asarray(int(result.truncated), np.int32)}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_warn"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._warn = WarnOnce("bad SFT rows")


class _CarryEvents(grain.IterDataset):
    """Drops skipped rows, adding their counts (and each example's truncation) to the next example as `event_*`
    features: int32 arrays as long as its inputs, the count at position 0."""

    def __iter__(self) -> "_CarryEventsIterator":
        return _CarryEventsIterator(self._parent.__iter__())


class _CarryEventsIterator(grain.DatasetIterator):
    _MUTATES_ELEMENT_SPEC = True

    def __init__(self, parent: grain.DatasetIterator) -> None:
        super().__init__(parent)
        self._pending = np.zeros(len(EVENTS), np.int64)

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            element = next(self._parent)
            if "skip" in element:
                self._pending += element["skip"]
                continue
            counts = self._pending.copy()
            counts[EVENTS.index("truncated")] += int(element.pop("truncated"))
            self._pending[:] = 0
            n = len(element["inputs"])
            for key, count in zip(EVENT_KEYS, counts):
                arr = np.zeros(n, np.int32)
                arr[0] = count
                element[key] = arr
            return element

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "pending": [int(x) for x in self._pending]}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = np.asarray(state["pending"], np.int64)


def sft_examples(docs: grain.MapDataset, encoder: SftEncoder, read_options: grain.ReadOptions) -> grain.IterDataset:
    """Shuffled, repeated rows (as prepared by the caller) -> encoded examples with event counts."""
    return _CarryEvents(docs.map(encoder).to_iter_dataset(read_options))


def sft_features(seq_len: int) -> tuple[dict[str, int], tuple[str, ...]]:
    """(length_struct, meta_features) for grain's packers: only inputs/targets get segment ids and positions."""
    meta = ("targets_weights", "sources", *EVENT_KEYS)
    return {"inputs": seq_len, "targets": seq_len, **{k: seq_len for k in meta}}, meta


def pad_row(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """data.packing=none: one example per row, padded with zeros; segment id 1 on its tokens, positions 0.. ."""
    n = len(example["inputs"])
    row = {}
    for key, value in example.items():
        padded = np.zeros(seq_len, value.dtype)
        padded[:n] = value
        row[key] = padded
    seg = np.zeros(seq_len, np.int32)
    seg[:n] = 1
    row["inputs_segment_ids"] = row["targets_segment_ids"] = seg
    row["inputs_positions"] = np.where(seg > 0, np.arange(seq_len, dtype=np.int32), 0).astype(np.int32)
    return row


def finalize_sft(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch keys (+ `sources` and `event_*`, removed by DataStream); padding never carries weight."""
    out = {"inputs": row["inputs"], "targets": row["targets"], "inputs_segment_ids": row["inputs_segment_ids"],
           "inputs_positions": row["inputs_positions"],
           "targets_weights": (row["targets_weights"] * (row["inputs_segment_ids"] > 0)).astype(np.float32),
           "sources": row["sources"]}
    return out | {k: row[k] for k in EVENT_KEYS}


def check_sft_rows(docs: Any, encoder: SftEncoder, where: str, max_bad_fraction: float, sample: int) -> None:
    """Encodes up to `sample` rows spread over `docs` (train semantics) before anything compiles: stops with one
    line when the template never yields an assistant span, when more than `max_bad_fraction` of the rows are bad,
    or when no row gives a trainable example."""
    n = len(docs)
    idx = sorted(set(np.linspace(0, n - 1, min(n, sample)).round().astype(int).tolist()))
    split = encoder.want_eval, encoder.threshold
    encoder.want_eval, encoder.threshold = False, 0
    counts = {"ok": 0, "bad": 0, "dropped": 0, "no_span": 0}
    try:
        for i in idx:
            record, at = docs[i]
            try:
                result = encoder.encode(record, at)
            except NoAssistantSpan:
                counts["no_span"] += 1
                continue
            counts["ok" if result.example is not None else str(result.event)] += 1
    finally:
        encoder.want_eval, encoder.threshold = split
    if counts["no_span"] and not counts["ok"] and encoder.template is not None:
        raise ConfigError(f"data.chat_template: {encoder.template.name} yields no assistant span (an assistant "
                          "message renders as no text); pick another template")
    bad = counts["bad"] + counts["no_span"]
    if bad / len(idx) > max_bad_fraction:
        raise ConfigError(f"{where}: {bad} of {len(idx)} sampled rows are malformed ({bad / len(idx):.0%} > "
                          f"data.max_bad_fraction={max_bad_fraction}); see the warnings above, fix the data or raise "
                          "data.max_bad_fraction")
    if not counts["ok"]:
        raise ConfigError(f"{where}: none of {len(idx)} sampled rows gives a trainable example ({counts['dropped']} "
                          f"dropped: longer than data.seq_len with data.truncation={encoder.truncation}, or nothing "
                          "left to train on); raise data.seq_len or set data.truncation=left")


def open_sft_rows(comp: Any, data: DataConfig, tokenizer: Any, template: ChatTemplate | None, split: str,
                  shard_index: int, shard_count: int, sample: int) -> tuple[grain.MapDataset, SftEncoder] | None:
    """The rows of one SFT mixture component for this host and its encoder, checked on a sample; None (with a
    warning) for a mixture source without rows, ConfigError when the only source has none."""
    key = source_key(comp, bool(data.mixture))
    files = component_files(comp, bool(data.mixture))
    if files is None:
        return None
    source = open_source(comp.format, files, text_field=None)
    if len(source) == 0:
        message = f"{key}: {comp.path!r} has no rows ({len(files)} file(s), all empty or unreadable)"
        if not data.mixture:
            raise ConfigError(message)
        log.warning("data: skipping source %s: %s", comp.name, message)
        return None
    rows = grain.MapDataset.source(Rows(source))[shard_index::shard_count]
    if len(rows) == 0:
        raise ConfigError(f"{key}: {comp.path!r} has {len(source)} rows, fewer than the {shard_count} data shards")
    fields = Fields(comp.prompt_field, comp.completion_field, comp.messages_field)
    encoder = SftEncoder(tokenizer, template if comp.example_format in ("messages", "prompt_completion") else None,
                         comp.example_format, fields, data, split)
    check_sft_rows(rows, encoder, key, data.max_bad_fraction, sample)
    if split == "eval" and not any(r is not None and encoder.in_split(r) for r, _ in (rows[i] for i in range(len(rows)))):
        raise ConfigError(f"data.eval_fraction={data.eval_fraction} leaves no held-out rows of {comp.name!r}; raise "
                          "data.eval_fraction or add rows")
    log.info("data: %s (%s %s) %d of %d rows for shard %d/%d", comp.name, comp.format, comp.example_format,
             len(rows), len(source), shard_index, shard_count)
    return rows, encoder
