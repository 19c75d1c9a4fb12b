"""The grain pretraining pipeline: documents -> tokens -> next-token chunks -> packed rows -> batches.

Stage order and why:
  1. A random-access list of documents (files or JSONL lines), sliced per host *before* shuffling so hosts read
     disjoint documents, then shuffled and repeated (each epoch reshuffled: grain folds the epoch into the seed).
     Everything up to here is index arithmetic, so the iterator state stays a handful of integers.
  2. Tokenise per document (lazily, in grain's reader threads) as [bos] + ids + [eos].
  3. Split each document into chunks of seq_len + 1 tokens with stride seq_len: consecutive chunks overlap by one
     token, so every next-token target of the document appears exactly once and none crosses a document.
     Each chunk becomes {"inputs": chunk[:-1], "targets": chunk[1:]}.
  4. First-/best-fit packing of chunks into rows of seq_len; grain emits segment ids (1, 2, ... per chunk,
     0 = padding) and positions (restarting at 0 per chunk) that the model uses for attention masking and RoPE.
  5. Batch rows and derive `targets_weights` from the segment ids (padding is the only position without a target).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from maxlm.config import ConfigError, DataConfig
from maxlm.data.sources import JsonlSource, SyntheticSource, TextFileSource, list_files
from maxlm.data.tokenizer import BOS_ID, EOS_ID, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

# Packing bins per packed group are max(batch_size, MIN_PACKING_BINS): more open bins let short documents and the
# tails of long ones fill gaps (higher fill rate) at the price of a little memory and resume replay.
MIN_PACKING_BINS = 64
# Documents read and tokenised ahead by grain's reader threads, overlapping with packing in the main thread. On the
# 2-core dev box (stdlib corpus, seq 256): 0 threads ~0.8M tokens/s, 2 threads ~1.0M, 4 threads ~1.3M. A small buffer
# keeps startup and resume (which refills it) fast.
READ_THREADS = 2
READ_BUFFER = 32

# Below this many documents per shard, shuffle several copies of the list at once (see build_dataset).
MIN_SHUFFLE_SIZE = 4096

BATCH_KEYS = ("inputs", "targets", "inputs_segment_ids", "inputs_positions", "targets_weights")


def mix_seed(shuffle_seed: int, seed: int) -> int:
    """One 32-bit seed from the data and run seeds (grain's shuffle takes [0, 2**32))."""
    state = np.random.SeedSequence([shuffle_seed % 2**64, seed % 2**64]).generate_state(1)
    return int(state[0])


class _Tokenize:
    """Document (text, token array, or None for an unusable one) -> int32 token array with bos/eos markers."""

    def __init__(self, tokenizer: Tokenizer | None, add_bos: bool, add_eos: bool) -> None:
        self.tokenizer = tokenizer
        self.head = [BOS_ID] if add_bos else []
        self.tail = [EOS_ID] if add_eos else []

    def __call__(self, doc: str | np.ndarray | None) -> np.ndarray:
        if doc is None or len(doc) == 0:
            return np.zeros(0, np.int32)  # an empty document contributes no example (not even bos -> eos)
        if isinstance(doc, str):
            assert self.tokenizer is not None
            ids = self.tokenizer.encode(doc)
        else:
            ids = doc.tolist()
        return np.asarray(self.head + ids + self.tail, dtype=np.int32)


class _ChunkDocument(grain.experimental.FlatMapTransform):
    """Token array -> next-token examples of at most seq_len targets each (see module docstring, stage 3)."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.max_fan_out = 1 << 30  # only consulted by the MapDataset flavour of flat map; ours is an IterDataset

    def flat_map(self, tokens: np.ndarray) -> Sequence[dict[str, np.ndarray]]:
        n, s = len(tokens), self.seq_len
        return [{"inputs": tokens[i:min(i + s, n - 1)], "targets": tokens[i + 1:min(i + s + 1, n)]}
                for i in range(0, n - 1, s)]


def _finalize(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keeps the documented batch keys; targets carry the same segments as inputs, so weights come from them."""
    return {
        "inputs": row["inputs"],
        "targets": row["targets"],
        "inputs_segment_ids": row["inputs_segment_ids"],
        "inputs_positions": row["inputs_positions"],
        "targets_weights": (row["targets_segment_ids"] > 0).astype(np.float32),
    }


def _document_source(data: DataConfig, vocab_size: int, seed: int) -> tuple[Any, Tokenizer | None]:
    if data.source == "synthetic":
        return SyntheticSource(vocab_size, data.seq_len, seed), None
    if data.source not in ("text", "jsonl"):
        raise ConfigError(f"data.source={data.source!r} is not one of synthetic, text, jsonl")
    if not data.tokenizer:
        raise ConfigError(f"data.tokenizer is empty; data.source={data.source} needs a sentencepiece model "
                          "(train one with `maxlm tokenizer train`)")
    tokenizer = load_tokenizer(data.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"data.tokenizer {data.tokenizer} has {tokenizer.vocab_size} tokens, more than "
                          f"model.vocab_size={vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")
    if not data.path:
        raise ConfigError(f"data.path is empty; set data.path=GLOB for data.source={data.source}")
    files = list_files(data)
    source = TextFileSource(files) if data.source == "text" else JsonlSource(files, data.text_field)
    if len(source) == 0:
        raise ConfigError(f"data.path: {data.path!r} has no documents ({len(files)} file(s), all empty)")
    return source, tokenizer


def _check_has_document(docs: grain.MapDataset, tokenize: _Tokenize, data: DataConfig, total: int,
                        shard_index: int, shard_count: int) -> None:
    """Fails at build time, before anything compiles, if this host would never produce a single example.

    Stops at the first usable document, which on a healthy corpus is the first one read.
    """
    for i in range(len(docs)):
        if len(tokenize(docs[i])) >= 2:
            return
    where = f" in shard {shard_index} of {shard_count}" if shard_count > 1 else ""
    if data.source == "text":
        why = f"{len(docs)} of {total} files read: all empty or not UTF-8"
    else:
        why = f"{len(docs)} of {total} lines read: all blank, invalid JSON or without a string {data.text_field!r}"
    raise ConfigError(f"data.path: {data.path!r} has no documents with text{where} ({why})")


def build_dataset(data: DataConfig, *, vocab_size: int, batch_size: int, seed: int, shard_index: int = 0,
                  shard_count: int = 1) -> grain.IterDataset:
    """The infinite stream of packed batches for one host (process `shard_index` of `shard_count`).

    Each element is a dict of numpy arrays of shape [batch_size, data.seq_len]: `inputs`, `targets`,
    `inputs_segment_ids`, `inputs_positions` (int32) and `targets_weights` (float32). The order depends only on
    (data.shuffle_seed, seed, shard_index, shard_count); `iter(ds).get_state()` / `set_state()` resume it exactly.
    Raises ConfigError for anything that would otherwise fail (or silently train on nothing) later.
    """
    if batch_size <= 0:
        raise ConfigError(f"data: batch_size per host must be positive, got {batch_size}")
    if data.seq_len <= 0:
        raise ConfigError(f"data.seq_len must be positive, got {data.seq_len}")
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"data: shard_index={shard_index} must be in [0, shard_count={shard_count})")
    mixed = mix_seed(data.shuffle_seed, seed)
    source, tokenizer = _document_source(data, vocab_size, mixed)
    tokenize = _Tokenize(tokenizer, data.add_bos, data.add_eos)

    docs = grain.MapDataset.source(source)[shard_index::shard_count]
    if data.source != "synthetic":
        if len(docs) == 0:
            unit = "files" if data.source == "text" else "documents"
            raise ConfigError(f"data.path: {data.path!r} has {len(source)} {unit}, fewer than the {shard_count} data "
                              f"shards (one per process), so no documents for shard {shard_index}; add data or use "
                              "fewer processes")
        _check_has_document(docs, tokenize, data, len(source), shard_index, shard_count)
        log.info("data: %s source, %d of %d %s for shard %d/%d, tokenizer vocab %d", data.source, len(docs),
                 len(source), "files" if data.source == "text" else "documents", shard_index, shard_count,
                 tokenizer.vocab_size if tokenizer else 0)
        # grain's index shuffle costs ~10 ms / len(docs) per element (5 ms per document on a 2-file corpus), so a
        # small corpus is shuffled as several concatenated copies: each document still appears equally often.
        copies = -(-MIN_SHUFFLE_SIZE // len(docs))
        docs = (docs.repeat(copies) if copies > 1 else docs).shuffle(seed=mixed)
    docs = docs.repeat().map(tokenize)  # synthetic documents are already i.i.d. in their index: no shuffle

    examples = grain.experimental.FlatMapIterDataset(
        docs.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER)),
        _ChunkDocument(data.seq_len))
    pack_cls = {"first_fit": grain.experimental.FirstFitPackIterDataset,
                "best_fit": grain.experimental.BestFitPackIterDataset}.get(data.packing)
    if pack_cls is None:
        raise ConfigError(f"data.packing={data.packing!r} is not one of first_fit, best_fit")
    packed = pack_cls(examples, length_struct={"inputs": data.seq_len, "targets": data.seq_len},
                      num_packing_bins=max(batch_size, MIN_PACKING_BINS), seed=mixed, shuffle_bins=True)
    ds = packed.map(_finalize).batch(batch_size, drop_remainder=True)
    if data.num_workers > 0:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
    return ds


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which raise unless parsed; maxlm has its own CLI, so mark them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def pack_stats(batch: dict[str, np.ndarray]) -> float:
    """Fill rate of a batch: the fraction of positions holding a real token (1.0 = no padding)."""
    return float(np.mean(np.asarray(batch["inputs_segment_ids"]) > 0))
