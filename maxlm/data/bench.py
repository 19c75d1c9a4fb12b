"""`maxlm bench-data`: tokens per second of the input pipeline, the cache builder and the cache reader.

The bar is set by the train step: the pipeline must outrun it by a wide margin (10x on the 2-core dev box), so
that data never shows up in step time. Token counts include padding, like the train step's tokens/s, so the two
figures compare directly; `real_tokens_per_s` and `fill_rate` give the padding-free view.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import numpy as np

from maxlm.config import Config, ConfigError


def time_batches(data: Any, cfg: Config, batches: int, warmup: int) -> dict[str, Any]:
    """Draws warmup + batches batches of the training stream; times the last `batches`."""
    from maxlm.data.pipeline import build_dataset

    t0 = time.perf_counter()
    it = iter(build_dataset(data, vocab_size=cfg.model.vocab_size, batch_size=cfg.train.global_batch_size,
                            seed=cfg.seed, total_steps=max(cfg.train.steps, 1)))
    try:
        next(it)
        startup = time.perf_counter() - t0
        for _ in range(warmup):
            next(it)
        t1 = time.perf_counter()
        real = 0
        for _ in range(batches):
            real += int((next(it)["inputs_segment_ids"] > 0).sum())
        elapsed = time.perf_counter() - t1
        stats = it.stats()
    finally:
        it.close()
    tokens = batches * cfg.train.global_batch_size * data.seq_len
    return {"tokens_per_s": tokens / elapsed, "real_tokens_per_s": real / elapsed, "fill_rate": real / tokens,
            "batches": batches, "seconds": elapsed, "startup_s": startup, "num_workers": data.num_workers,
            "mix": {k[len("data_mix_"):]: round(v, 4) for k, v in stats.items() if k.startswith("data_mix_")}}


def time_cache_reads(cache_dir: str, seconds: float = 2.0) -> dict[str, Any]:
    """Raw reader speed: shuffled documents decoded from the ArrayRecord parts, one thread, no packing."""
    from maxlm.data.cache import Cache

    cache = Cache(cache_dir)
    tokens = docs = 0
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for name in cache.names:
        src = cache.documents(name, "train", 0.0)
        for i in rng.permutation(len(src)):
            tokens += len(src[int(i)])
            docs += 1
            if time.perf_counter() - t0 > seconds / len(cache.names):
                break
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": tokens / elapsed, "docs_per_s": docs / elapsed, "documents": docs}


def bench_data(cfg: Config, *, batches: int = 100, warmup: int = 5, workers: int = 2,
               cache_dir: str | None = None) -> dict[str, Any]:
    """Times (1) the on-the-fly pipeline with `workers` grain processes, (2) building the cache (into a temporary
    directory unless `data.cache_dir` already holds one), (3) reading it, raw and as packed batches."""
    from maxlm.data.prepare import prepare_cache
    from maxlm.config.data_spec import components

    result: dict[str, Any] = {"batch_size": cfg.train.global_batch_size, "seq_len": cfg.data.seq_len}
    has_files = any(c.needs_files for c in components(cfg.data))
    raw = dataclasses.replace(cfg.data, cache_dir="", num_workers=workers)
    try:
        result["pipeline"] = time_batches(raw, cfg, batches, warmup)
    except ConfigError as e:  # e.g. a cache-only config whose raw files live elsewhere
        result["pipeline"] = {"error": str(e)}
    if not has_files:
        return result
    tmp = None
    cache_dir = cache_dir or cfg.data.cache_dir
    if not cache_dir or not os.path.isfile(os.path.join(cache_dir, "manifest.json")):
        if not cache_dir:
            tmp = tempfile.TemporaryDirectory(prefix="maxlm-bench-cache-")
            cache_dir = tmp.name
        prep = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=cache_dir))
        t0 = time.perf_counter()
        manifest = prepare_cache(prep, progress=False)
        elapsed = time.perf_counter() - t0
        tokens = sum(c["tokens"] for c in manifest["components"].values())
        result["prepare"] = {"tokens_per_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed,
                             "workers": cfg.data.prepare_workers or os.cpu_count()}
    try:
        result["cache_read"] = time_cache_reads(cache_dir)
        cached = dataclasses.replace(cfg.data, cache_dir=cache_dir, num_workers=0)
        result["cache_pipeline"] = time_batches(cached, cfg, batches, warmup)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return result
