"""The pre-tokenized cache that `maxlm data prepare` writes and training reads.

Layout of `data.cache_dir`:

    plan.json                 what to tokenize: the fingerprint of the inputs and every task's file pieces
    tokenizer.model           a copy of the tokenizer (training needs no other)
    <component>/part-NNNNN.arrayrecord   one record per document: its token ids (no bos/eos), raw little-endian
    <component>/part-NNNNN.npz           the index of that part: per document its content hash, tokens, UTF-8 bytes
    <component>/part-NNNNN.json          written last, atomically: the part is complete (and its counts)
    <component>/duplicates.npy           record numbers (within the component) that repeat an earlier document
    manifest.json             written last: the cache is complete; totals, cleaning counts, component specs

Documents are stored whole and without bos/eos, so `seq_len`, `packing`, `add_bos/add_eos`, the mixture weights,
`shuffle_seed` and `eval_fraction` are all read-time choices: none needs re-tokenisation. The held-out split is
computed from the stored hashes with the same rule as the on-the-fly pipeline (maxlm.data.clean.is_eval).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from maxlm.config import ConfigError, DataConfig
from maxlm.data.clean import eval_threshold
from maxlm.config.data_spec import MixtureComponent

CACHE_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
TOKENIZER = "tokenizer.model"
DUPLICATES = "duplicates.npy"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads exactly one document
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # ArrayRecord's documented random-access setting


def token_dtype(vocab_size: int) -> str:
    """uint16 halves the cache for vocabularies up to 65,536 ids (sentencepiece models up to Llama 2's 32k)."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def write_json_atomic(path: str, obj: Any) -> None:
    """Write-then-rename: an interrupted run never leaves a half-written marker that looks complete."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def filter_spec(data: DataConfig) -> dict[str, Any]:
    """The cleaning settings baked into a cache (compared on read: they cannot change without re-preparing)."""
    return {"min_doc_chars": data.min_doc_chars, "max_doc_chars": data.max_doc_chars,
            "max_non_text_ratio": data.max_non_text_ratio}


@dataclass
class CachedComponent:
    """One component of a complete cache: its parts and the per-document index, concatenated in part order."""

    name: str
    paths: list[str]  # the part files, in order; record r of the component is the r-th record across them
    hashes: np.ndarray  # uint64 content hash per document
    tokens: np.ndarray  # int64 token count per document (without bos/eos)
    nbytes: np.ndarray  # int64 UTF-8 bytes per document
    duplicate: np.ndarray  # bool: an exact copy of an earlier document (skipped)
    dtype: str

    def __len__(self) -> int:
        return len(self.hashes)

    def select(self, split: str, eval_fraction: float) -> np.ndarray:
        """Record numbers of the non-duplicate documents in `split` ("train" or "eval"), in record order."""
        held_out = self.hashes < np.uint64(eval_threshold(eval_fraction))
        keep = ~self.duplicate & (held_out if split == "eval" else ~held_out)
        return np.flatnonzero(keep)


class CachedDocuments:
    """A random-access source of token arrays: documents `indices` of a cached component.

    Readers open lazily, so the object pickles as a list of paths and indices (grain worker processes open their
    own) and costs nothing until read.
    """

    bad_count = 0
    static_bad = 0

    def __init__(self, paths: list[str], indices: np.ndarray, dtype: str, name: str = "") -> None:
        self.paths = list(paths)
        self.indices = np.asarray(indices, np.int64)
        self.dtype = np.dtype(dtype)
        self.name = name
        self._source: Any = None

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self) -> Any:
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    def __getitem__(self, index: int) -> np.ndarray:
        raw = self._open()[int(self.indices[index])]
        return np.frombuffer(raw, self.dtype).astype(np.int32)

    def describe(self, index: int) -> str:
        return f"cache {self.name} record {int(self.indices[index])}"

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}


class Cache:
    """A complete cache directory (one whose manifest exists), checked against the run's data config."""

    def __init__(self, cache_dir: str) -> None:
        self.dir = cache_dir
        path = os.path.join(cache_dir, MANIFEST)
        if not os.path.isfile(path):
            partial = os.path.isfile(os.path.join(cache_dir, PLAN))
            why = "is incomplete (an interrupted prepare; rerun it to finish)" if partial else "has no cache"
            raise ConfigError(f"data.cache_dir={cache_dir} {why}; run `maxlm data prepare CONFIG` first")
        self.manifest = read_json(path)
        if self.manifest.get("version") != CACHE_VERSION:
            raise ConfigError(f"data.cache_dir={cache_dir} was written by another cache version "
                              f"({self.manifest.get('version')}, expected {CACHE_VERSION}); rerun `maxlm data prepare`")
        self.tokenizer_path = os.path.join(cache_dir, TOKENIZER)
        self._loaded: dict[str, CachedComponent] = {}

    @property
    def names(self) -> list[str]:
        return list(self.manifest["components"])

    def check(self, data: DataConfig, comps: list[MixtureComponent]) -> list[MixtureComponent]:
        """The config's file components that the cache holds; raises when the cache was built differently.

        A component whose files matched nothing at prepare time is absent from the cache: it is dropped here with
        the same warning the raw pipeline gives, so both paths train on the same mixture.
        """
        baked = self.manifest["filters"]
        if baked != filter_spec(data):
            raise ConfigError(f"data.cache_dir={self.dir} was prepared with cleaning {baked}, the config asks for "
                              f"{filter_spec(data)}; rerun `maxlm data prepare` or match the settings")
        if data.tokenizer and os.path.isfile(data.tokenizer) and \
                file_sha256(data.tokenizer) != self.manifest["tokenizer_sha256"]:
            raise ConfigError(f"data.tokenizer={data.tokenizer} differs from the tokenizer the cache in "
                              f"{self.dir} was prepared with; clear data.tokenizer or rerun `maxlm data prepare`")
        out = []
        for c in comps:
            entry = self.manifest["components"].get(c.name)
            if entry is None:
                if c.name in self.manifest.get("skipped", {}):
                    continue
                raise ConfigError(f"data.cache_dir={self.dir} has no source {c.name!r} (it has "
                                  f"{', '.join(self.names) or 'none'}); rerun `maxlm data prepare` for this config")
            if entry["spec"] != c.spec():
                diff = {k: (entry["spec"].get(k), v) for k, v in c.spec().items() if entry["spec"].get(k) != v}
                raise ConfigError(f"data.cache_dir: source {c.name!r} was prepared with different settings "
                                  f"(cache vs config: {diff}); rerun `maxlm data prepare`")
            out.append(c)
        return out

    def component(self, name: str) -> CachedComponent:
        if name not in self._loaded:
            entry = self.manifest["components"][name]
            parts = entry["parts"]
            index = [np.load(os.path.join(self.dir, name, f"{p}.npz")) for p in parts]
            hashes = np.concatenate([i["hashes"] for i in index] or [np.zeros(0, np.uint64)])
            dup = np.zeros(len(hashes), bool)
            dup[np.load(os.path.join(self.dir, name, DUPLICATES))] = True
            self._loaded[name] = CachedComponent(
                name=name, paths=[os.path.join(self.dir, name, f"{p}.arrayrecord") for p in parts], hashes=hashes,
                tokens=np.concatenate([i["tokens"] for i in index] or [np.zeros(0, np.int64)]).astype(np.int64),
                nbytes=np.concatenate([i["nbytes"] for i in index] or [np.zeros(0, np.int64)]).astype(np.int64),
                duplicate=dup, dtype=self.manifest["dtype"])
        return self._loaded[name]

    def documents(self, name: str, split: str, eval_fraction: float, shard_index: int = 0,
                  shard_count: int = 1) -> CachedDocuments:
        """This host's share of a component's documents in `split`: every `shard_count`-th, from `shard_index`."""
        comp = self.component(name)
        indices = comp.select(split, eval_fraction)[shard_index::shard_count]
        return CachedDocuments(comp.paths, indices, comp.dtype, name)
