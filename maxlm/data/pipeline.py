"""The grain pretraining pipeline: sources -> tokens -> next-token chunks -> mixture -> packed rows -> batches.

Stage order and why:
  1. Per mixture component, a random-access list of documents (files, JSONL lines, Parquet rows, ArrayRecord
     records, or pre-tokenized documents from a `maxlm data prepare` cache), sliced per host *before* shuffling so
     hosts read disjoint documents, then shuffled and repeated (each epoch reshuffled: grain folds the epoch into
     the seed). Everything up to here is index arithmetic, so the iterator state stays a handful of integers.
  2. Per document (lazily, in grain's reader threads): drop it if unusable, filtered (maxlm.data.clean) or on the
     other side of the held-out split, then tokenise as [bos] + ids + [eos] (cached documents are already ids).
  3. Split each document into chunks of seq_len + 1 tokens with stride seq_len: consecutive chunks overlap by one
     token, so every next-token target of the document appears exactly once and none crosses a document.
     Each chunk becomes {"inputs": chunk[:-1], "targets": chunk[1:]}.
  4. Mix the components' chunks by token share (maxlm.data.mixture), tagging each with its source id.
  5. First-/best-fit packing of chunks into rows of seq_len; grain emits segment ids (1, 2, ... per chunk,
     0 = padding) and positions (restarting at 0 per chunk) that the model uses for attention masking and RoPE.
  6. Batch rows, derive `targets_weights` from the segment ids (padding is the only position without a target),
     optionally in grain worker processes (`data.num_workers`).
  7. maxlm.data.stream.DataStream on top: stages of the mixture, realised proportions and fill rate, and an
     iterator state that refuses to restore onto a different sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from maxlm.config import ConfigError, DataConfig
from maxlm.data.cache import Cache
from maxlm.data.clean import Filters, document_hash, eval_threshold
from maxlm.data.mixture import TokenMixIterDataset
from maxlm.data.items import component_files, source_key
from maxlm.data.sources import SyntheticSource, open_source
from maxlm.config.data_spec import MixtureComponent, components, num_stages, stage_start_steps
from maxlm.data.stream import DataStream
from maxlm.data.chat_template import resolve_chat_template
from maxlm.data.hf_tokenizer import TextTokenizer, load_text_tokenizer
from maxlm.data.sft_pipeline import SftEncoder, finalize_sft, open_sft_rows, pad_row, sft_examples, sft_features
from maxlm.data.tokenizer import BOS_ID, EOS_ID

log = logging.getLogger(__name__)

# Packing bins per packed group are max(batch_size, MIN_PACKING_BINS): more open bins let short documents and the
# tails of long ones fill gaps (higher fill rate) at the price of a little memory and resume replay.
MIN_PACKING_BINS = 64
# Documents read and tokenised ahead by grain's reader threads, overlapping with packing in the main thread. On the
# 2-core dev box (stdlib corpus, seq 256): 0 threads ~0.8M tokens/s, 2 threads ~1.0M, 4 threads ~1.3M. A small buffer
# keeps startup and resume (which refills it) fast.
READ_THREADS = 2
READ_BUFFER = 32
# Below this many documents per shard, shuffle several copies of the list at once (see _examples).
MIN_SHUFFLE_SIZE = 4096
# Documents read at build time to check that a source is usable and not mostly bad (data.max_bad_fraction).
BAD_SAMPLE = 100

BATCH_KEYS = ("inputs", "targets", "inputs_segment_ids", "inputs_positions", "targets_weights")
SPLITS = ("train", "eval")


def mix_seed(*parts: int) -> int:
    """One 32-bit seed from several integers (grain's shuffle takes [0, 2**32))."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1)
    return int(state[0])


class _Tokenize:
    """Document (text, token array, or None for an unusable one) -> int32 token array with bos/eos markers.

    Text documents are first checked against the quality filters and the held-out split (so train and eval never
    share a document); a rejected document becomes an empty array, which yields no example.
    """

    def __init__(self, tokenizer: TextTokenizer | None, add_bos: bool, add_eos: bool, filters: Filters | None = None,
                 split: str = "train", eval_fraction: float = 0.0) -> None:
        self.tokenizer = tokenizer
        bos = tokenizer.bos_id if tokenizer is not None else BOS_ID
        eos = tokenizer.eos_id if tokenizer is not None else EOS_ID
        self.head = np.asarray([bos] if add_bos and bos is not None else [], np.int32)
        self.tail = np.asarray([eos] if add_eos and eos is not None else [], np.int32)
        self.filters = filters if filters is not None and filters.active else None
        self.want_eval = split == "eval"
        self.threshold = eval_threshold(eval_fraction) if eval_fraction > 0 else 0

    def keep(self, text: str) -> bool:
        if not text.strip():
            return False
        if self.filters is not None and self.filters.reject(text):
            return False
        if self.threshold or self.want_eval:
            return (document_hash(text) < self.threshold) == self.want_eval
        return True

    def __call__(self, doc: str | np.ndarray | None) -> np.ndarray:
        if doc is None or len(doc) == 0:
            return np.zeros(0, np.int32)  # an empty document contributes no example (not even bos -> eos)
        if isinstance(doc, str):
            if not self.keep(doc):
                return np.zeros(0, np.int32)
            assert self.tokenizer is not None
            ids = np.asarray(self.tokenizer.encode(doc), np.int32)
        else:
            ids = doc.astype(np.int32, copy=False)
        return np.concatenate([self.head, ids, self.tail])


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
    """Keeps the documented batch keys (+ `sources`, removed by DataStream); targets carry the same segments as
    inputs, so weights come from them."""
    return {
        "inputs": row["inputs"],
        "targets": row["targets"],
        "inputs_segment_ids": row["inputs_segment_ids"],
        "inputs_positions": row["inputs_positions"],
        "targets_weights": (row["targets_segment_ids"] > 0).astype(np.float32),
        "sources": row["sources"],
    }


@dataclass
class _Component:
    """One mixture component, resolved for this host: its documents and how to turn one into tokens."""

    spec: MixtureComponent
    source_id: int  # 1-based position in the mixture (0 marks padding in the `sources` tag)
    docs: Any  # random-access documents of this shard (already sliced for the cache and synthetic data)
    tokenize: _Tokenize | SftEncoder  # SftEncoder: rows of an SFT source (data.example_format)
    shuffle: bool


def tokenizer_path(data: DataConfig) -> str:
    """The tokenizer the pipeline uses: the cache's own copy when reading a cache, else data.tokenizer."""
    if data.cache_dir:
        return os.path.join(data.cache_dir, "tokenizer.model")
    return data.tokenizer


def _load_checked_tokenizer(path: str, vocab_size: int) -> TextTokenizer:
    tokenizer = load_text_tokenizer(path)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"data.tokenizer {path} has {tokenizer.vocab_size} tokens, more than "
                          f"model.vocab_size={vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")
    return tokenizer


def _resolve(data: DataConfig, vocab_size: int, seed: int, shard_index: int, shard_count: int, split: str,
             stages: int) -> list[_Component]:
    """Every component weighted in one of the first `stages` stages, with its documents for this host, checked to
    yield examples (else ConfigError)."""
    comps = [c for c in components(data) if any(c.weight_at(k) > 0 for k in range(stages))]
    file_comps = [c for c in comps if c.needs_files]
    tokenizer = cache = None
    if file_comps:
        if data.cache_dir:
            cache = Cache(data.cache_dir)
            kept = {c.name for c in cache.check(data, file_comps)}
        else:
            if not data.tokenizer:
                raise ConfigError(f"data.tokenizer is empty; data.source={file_comps[0].format} needs a "
                                  "sentencepiece model (train one with `maxlm tokenizer train`)")
            kept = {c.name for c in file_comps}
        tokenizer = _load_checked_tokenizer(tokenizer_path(data), vocab_size)
    template = None
    if any(c.example_format in ("messages", "prompt_completion") for c in file_comps):
        template = resolve_chat_template(data.chat_template, tokenizer)
    filters = Filters.from_config(data)
    out: list[_Component] = []
    ids = {c.name: i + 1 for i, c in enumerate(components(data))}  # stable ids: the mixture's order
    for c in comps:
        i = ids[c.name] - 1
        tokenize = _Tokenize(tokenizer, data.add_bos, data.add_eos, filters, split, data.eval_fraction)
        if c.format == "synthetic":
            salt = 0 if split == "train" else 0x5EED  # a disjoint, equally learnable held-out stream
            # Each shard its own documents (shard 0 of 1 keeps the single-stream seed).
            shard = (shard_index, shard_count) if shard_count > 1 else ()
            out.append(_Component(c, i + 1, SyntheticSource(vocab_size, data.seq_len, mix_seed(
                data.shuffle_seed, seed, i, salt, *shard)), tokenize, shuffle=False))
            continue
        if c.name not in kept:
            continue
        if c.example_format != "text":
            opened = open_sft_rows(c, data, tokenizer, template, split, shard_index, shard_count, BAD_SAMPLE)
            if opened is not None:
                out.append(_Component(c, i + 1, opened[0], opened[1], shuffle=True))
            continue
        if cache is not None:
            docs = cache.documents(c.name, split, data.eval_fraction, shard_index, shard_count)
            if len(docs) == 0:
                raise ConfigError(_no_docs_message(data, c, split, shard_index, shard_count, "in the cache"))
            tokenize.filters, tokenize.threshold, tokenize.want_eval = None, 0, False  # decided at prepare time
            out.append(_Component(c, i + 1, docs, tokenize, shuffle=True))
            continue
        key = source_key(c, bool(data.mixture))
        files = component_files(c, bool(data.mixture))
        if files is None:
            continue
        source = open_source(c.format, files, text_field=c.text_field, text_split=c.text_split)
        if len(source) == 0:
            message = f"{key}: {c.path!r} has no documents ({len(files)} file(s), all empty or unreadable)"
            if not data.mixture:
                raise ConfigError(message)
            log.warning("data: skipping source %s: %s", c.name, message)
            continue
        docs = grain.MapDataset.source(source)[shard_index::shard_count]
        if len(docs) == 0:
            unit = "files" if c.format == "text" and c.text_split == "file" else "documents"
            raise ConfigError(f"{key}: {c.path!r} has {len(source)} {unit}, fewer than the {shard_count} data "
                              f"shards (one per process), so no documents for shard {shard_index}; add data or use "
                              "fewer processes")
        _check_usable(docs, source, tokenize, data, c, split, shard_index, shard_count)
        log.info("data: %s (%s) %d of %d documents for shard %d/%d", c.name, c.format, len(docs), len(source),
                 shard_index, shard_count)
        out.append(_Component(c, i + 1, docs, tokenize, shuffle=True))
    if not out:
        raise ConfigError("data: no source has usable documents (see the warnings above)")
    return out


def _no_docs_message(data: DataConfig, c: MixtureComponent, split: str, shard_index: int, shard_count: int,
                     where: str) -> str:
    shard = f" for shard {shard_index} of {shard_count}" if shard_count > 1 else ""
    if split == "eval":
        return (f"data.eval_fraction={data.eval_fraction} leaves no held-out documents of {c.name!r}{shard} "
                f"{where}; raise data.eval_fraction or add documents")
    return f"data: source {c.name!r} has no training documents{shard} {where}"


def _check_usable(docs: grain.MapDataset, source: Any, tokenize: _Tokenize, data: DataConfig, c: MixtureComponent,
                  split: str, shard_index: int, shard_count: int) -> None:
    """Fails at build time, before anything compiles, if this host would never produce an example of `c`, or if
    a sample of BAD_SAMPLE documents spread evenly over the shard is mostly unusable (> data.max_bad_fraction).

    The sample is spread out because bad files cluster (a directory of empty `__init__.py` files, one broken
    dump); the scan for a usable document then continues in order until one is found.
    """
    n = len(docs)
    sample = sorted(set(np.linspace(0, n - 1, min(n, BAD_SAMPLE)).round().astype(int).tolist()))
    found = False
    for i in sample:
        doc = docs[i]
        found = found or (isinstance(doc, str) and tokenize.keep(doc))
    items, bad = len(sample) + source.static_bad, source.bad_count
    read = len(sample)
    if not found:
        sampled = set(sample)
        for i in (i for i in range(n) if i not in sampled):
            doc = docs[i]
            read += 1
            if isinstance(doc, str) and tokenize.keep(doc):
                found = True
                break
    key = f"data.mixture ({c.name}).path" if data.mixture else "data.path"
    if not found:
        if split == "eval" and source.bad_count < read + source.static_bad:
            raise ConfigError(_no_docs_message(data, c, split, shard_index, shard_count, "among the files"))
        where = f" in shard {shard_index} of {shard_count}" if shard_count > 1 else ""
        if c.format == "text" and c.text_split == "file":
            why = f"{n} of {len(source)} files read: all empty or not UTF-8"
        else:
            why = f"{read} documents read: all blank, invalid, without a string {c.text_field!r} or filtered"
        raise ConfigError(f"{key}: {c.path!r} has no documents with text{where} ({why})")
    if items and bad / items > data.max_bad_fraction:
        raise ConfigError(f"{key}: {bad} of {items} sampled items of {c.path!r} are unreadable or malformed "
                          f"({bad / items:.0%} > data.max_bad_fraction={data.max_bad_fraction}); see the warnings "
                          "above, fix the data or raise data.max_bad_fraction")


def _examples(comp: _Component, data: DataConfig, seed: int) -> grain.IterDataset:
    """Stages 1-3 for one component: shuffled, repeated, tokenised documents cut into next-token chunks."""
    docs = comp.docs if isinstance(comp.docs, grain.MapDataset) else grain.MapDataset.source(comp.docs)
    if comp.shuffle:
        # grain's index shuffle costs ~10 ms / len(docs) per element (5 ms per document on a 2-file corpus), so a
        # small corpus is shuffled as several concatenated copies: each document still appears equally often.
        copies = -(-MIN_SHUFFLE_SIZE // len(docs))
        docs = (docs.repeat(copies) if copies > 1 else docs).shuffle(seed=seed)
    read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER)
    if isinstance(comp.tokenize, SftEncoder):
        return sft_examples(docs.repeat(), comp.tokenize, read)
    docs = docs.repeat().map(comp.tokenize)  # synthetic documents are already i.i.d. in their index: no shuffle
    return grain.experimental.FlatMapIterDataset(docs.to_iter_dataset(read), _ChunkDocument(data.seq_len))


def _stage_dataset(comps: list[_Component], stage: int, data: DataConfig, batch_size: int, seed: int,
                   salt: int) -> grain.IterDataset:
    """Stages 1-6 for one mixture stage (only its positively weighted components are read)."""
    active = [c for c in comps if c.spec.weight_at(stage) > 0]
    parents = [_examples(c, data, mix_seed(data.shuffle_seed, seed, c.source_id, stage, salt)) for c in active]
    mixed = TokenMixIterDataset(parents, [c.spec.weight_at(stage) for c in active], [c.source_id for c in active])
    sft = isinstance(active[0].tokenize, SftEncoder)
    if sft:
        lengths, meta = sft_features(data.seq_len)
    else:
        lengths, meta = {"inputs": data.seq_len, "targets": data.seq_len, "sources": data.seq_len}, ("sources",)
    if data.packing == "none":
        packed = mixed.map(functools.partial(pad_row, seq_len=data.seq_len))
    else:
        pack_cls = {"first_fit": grain.experimental.FirstFitPackIterDataset,
                    "best_fit": grain.experimental.BestFitPackIterDataset}[data.packing]
        packed = pack_cls(mixed, length_struct=lengths, num_packing_bins=max(batch_size, MIN_PACKING_BINS),
                          seed=mix_seed(data.shuffle_seed, seed, stage, salt), shuffle_bins=True, meta_features=meta)
    ds = packed.map(finalize_sft if sft else _finalize).batch(batch_size, drop_remainder=True)
    if data.num_workers > 0:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
    return ds


def build_dataset(data: DataConfig, *, vocab_size: int, batch_size: int, seed: int, shard_index: int = 0,
                  shard_count: int = 1, total_steps: int = 0, split: str = "train") -> DataStream:
    """The infinite stream of packed batches for one host (process `shard_index` of `shard_count`).

    Each element is a dict of numpy arrays of shape [batch_size, data.seq_len]: `inputs`, `targets`,
    `inputs_segment_ids`, `inputs_positions` (int32) and `targets_weights` (float32). The order depends only on
    (data.shuffle_seed, seed, shard_index, shard_count, data.num_workers); `iter(ds).get_state()` / `set_state()`
    resume it exactly, and the iterator's `stats()` gives the realised mixture and fill rate. `total_steps`
    (= train.steps) places the mixture stages of `data.stage_starts`; `split="eval"` gives the held-out documents.
    Raises ConfigError for anything that would otherwise fail (or silently train on nothing) later.
    """
    if batch_size <= 0:
        raise ConfigError(f"data: batch_size per host must be positive, got {batch_size}")
    if data.seq_len <= 0:
        raise ConfigError(f"data.seq_len must be positive, got {data.seq_len}")
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"data: shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if split not in SPLITS:
        raise ConfigError(f"data: split={split!r} is not one of {', '.join(SPLITS)}")
    if data.packing not in ("first_fit", "best_fit", "none"):
        raise ConfigError(f"data.packing={data.packing!r} is not one of first_fit, best_fit, none")
    if data.stage_starts and total_steps <= 0 and split == "train":
        raise ConfigError("data.stage_starts places stages at fractions of train.steps; build_dataset needs "
                          "total_steps=train.steps")
    stages = num_stages(data) if split == "train" else 1  # eval: the main (stage 0) mixture
    comps = _resolve(data, vocab_size, seed, shard_index, shard_count, split, stages)
    starts = stage_start_steps(data, total_steps)[:stages] if stages > 1 else [0]
    for stage in range(stages):
        if not any(c.spec.weight_at(stage) > 0 for c in comps):
            raise ConfigError(f"data: mixture stage {stage} has no usable source with a positive weight")

    def make_stage(stage: int, salt: int) -> grain.IterDataset:
        return _stage_dataset(comps, stage, data, batch_size, seed, salt)

    meta = {"shard_index": shard_index, "shard_count": shard_count, "num_workers": data.num_workers,
            "sources": [c.spec.name for c in comps], "split": split}
    names = {c.source_id: c.spec.name for c in comps}
    return DataStream(make_stage, starts, meta, names, batch_size * data.seq_len, data.resume)


def build_eval_batches(data: DataConfig, *, vocab_size: int, batch_size: int, seed: int, num_batches: int,
                       shard_index: int = 0, shard_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` batches of the held-out split for this host, read once (in process) and kept: every
    evaluation then scores exactly the same tokens."""
    eval_data = dataclasses.replace(data, num_workers=0, stage_starts=[])
    it = iter(build_dataset(eval_data, vocab_size=vocab_size, batch_size=batch_size, seed=seed, split="eval",
                            shard_index=shard_index, shard_count=shard_count))
    try:
        return [next(it) for _ in range(num_batches)]
    finally:
        it.close()


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which raise unless parsed; maxlm has its own CLI, so mark them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def pack_stats(batch: dict[str, np.ndarray]) -> float:
    """Fill rate of a batch: the fraction of positions holding a real token (1.0 = no padding)."""
    return float(np.mean(np.asarray(batch["inputs_segment_ids"]) > 0))
