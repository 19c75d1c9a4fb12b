"""`maxlm data prepare`: clean, tokenize and index the mixture once, in parallel, resumably (layout: cache.py).

Three phases:
  1. Plan (parent): every component's files are cut into tasks of about the same size (whole small files grouped;
     large JSONL files cut at line starts, Parquet at row groups, ArrayRecord at records). The plan depends only on
     the inputs, never on the worker count, and is saved with a fingerprint of the inputs (file names, sizes,
     mtimes), the tokenizer and the cleaning settings.
  2. Tokenize (worker processes): each task reads its documents, drops unusable and filtered ones (counting why),
     tokenizes the rest and writes one ArrayRecord part plus its index; a part's `.json` marker is renamed into
     place last. An interrupted prepare therefore resumes by skipping the parts whose marker exists.
  3. Finish (parent): exact duplicates are found from the index hashes across all components (the first copy in
     plan order is kept), bad-data limits are checked, and `manifest.json` is written: only now is the cache
     usable by training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np

from maxlm.config import Config, ConfigError
from maxlm.data import cache as C
from maxlm.data.clean import FILTER_REASONS, Filters, document_hash, eval_threshold
from maxlm.data.items import Piece, list_files
from maxlm.data.sources import open_source, split_lines
from maxlm.config.data_spec import MixtureComponent, components
from maxlm.config.paths import writable_dir

log = logging.getLogger(__name__)

# Task size: total input bytes / TARGET_TASKS, clamped to [MIN_TASK_BYTES, MAX_TASK_BYTES]. Enough tasks to keep
# every core busy and make resumption cheap, few enough that a corpus of terabytes has thousands of parts, not
# millions.
TARGET_TASKS = 64
MIN_TASK_BYTES = 1 << 20
MAX_TASK_BYTES = 256 << 20


def _file_stat(path: str) -> list[Any]:
    st = os.stat(path)
    return [path, st.st_size, int(st.st_mtime_ns)]


def _task_bytes(total: int) -> int:
    return int(min(MAX_TASK_BYTES, max(MIN_TASK_BYTES, total // TARGET_TASKS)))


def _plan_component(comp: MixtureComponent, files: list[str], target: int) -> list[list[Piece]]:
    """Groups whole small files and cuts large ones so each task holds about `target` input bytes."""
    tasks: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            tasks.append(current)
        current, size = [], 0

    for path in files:
        n = os.path.getsize(path)
        if n > target and comp.format in ("jsonl", "parquet", "arrayrecord"):
            flush()
            tasks.extend([p] for p in _cut_file(comp.format, path, n, target))
            continue
        current.append(Piece(path))
        size += n
        if size >= target:
            flush()
    flush()
    return tasks


def _cut_file(fmt: str, path: str, size: int, target: int) -> list[Piece]:
    if fmt == "jsonl":
        return split_lines(path, target)
    parts = -(-size // target)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            groups = pq.ParquetFile(path).metadata.num_row_groups
        except Exception:  # unreadable: one task, whose source reports the file as bad
            return [Piece(path)]
        step = max(1, -(-groups // parts))
        return [Piece(path, g, min(g + step, groups)) for g in range(0, groups, step)] or [Piece(path)]
    from maxlm.data.records import num_records

    n = num_records(path)
    if not n:
        return [Piece(path)]
    step = max(1, -(-n // parts))
    return [Piece(path, r, min(r + step, n)) for r in range(0, n, step)]


def make_plan(cfg: Config) -> dict[str, Any]:
    """The tasks of every file component, the fingerprint of everything that determines the cached tokens, and the
    components whose globs matched nothing (skipped with a warning)."""
    d = cfg.data
    if not d.tokenizer or not os.path.isfile(d.tokenizer):
        raise ConfigError(f"data.tokenizer: file not found: {d.tokenizer!r}; `maxlm data prepare` tokenizes with it")
    comps = [c for c in components(d) if c.needs_files]
    if not comps:
        raise ConfigError("data: nothing to prepare; data.source/data.mixture has no file sources (synthetic data "
                          "is generated on the fly)")
    files: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    for c in comps:
        try:
            files[c.name] = list_files(c.path, c.max_files, key=f"data.mixture ({c.name}).path" if d.mixture
                                       else "data.path")
        except ConfigError as e:
            if not d.mixture:
                raise
            log.warning("data: skipping source %s: %s", c.name, e)
            skipped[c.name] = str(e)
    if not files:
        raise ConfigError("data.mixture: no files match any source's path ("
                          + "; ".join(f"{c.name}: {c.path!r}" for c in comps) + ")")
    stats = {name: [_file_stat(p) for p in paths] for name, paths in files.items()}
    target = _task_bytes(sum(s[1] for v in stats.values() for s in v))
    from maxlm.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(d.tokenizer).vocab_size
    fingerprint = {"version": C.CACHE_VERSION, "tokenizer_sha256": C.file_sha256(d.tokenizer),
                   "dtype": C.token_dtype(vocab), "filters": C.filter_spec(d),
                   "components": [c.spec() for c in comps if c.name in files], "files": stats,
                   "task_bytes": target}
    tasks = []
    for c in comps:
        if c.name in files:
            for k, pieces in enumerate(_plan_component(c, files[c.name], target)):
                tasks.append({"component": c.name, "part": C.part_name(k), "pieces": [asdict(p) for p in pieces]})
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    return {"fingerprint": fingerprint, "fingerprint_sha256": digest, "tasks": tasks, "skipped": skipped,
            "vocab_size": vocab}


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: one task in a worker process

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, level: int) -> None:
    """Each worker loads the tokenizer once (not once per task) and inherits the parent's log level."""
    from maxlm.data.tokenizer import load_tokenizer

    logging.basicConfig(level=level, format="%(message)s")
    logging.getLogger("maxlm").setLevel(level)
    _WORKER["tokenizer"] = load_tokenizer(tokenizer_path)


def _run_task(job: dict[str, Any]) -> dict[str, Any]:
    """Tokenizes one task into `<component>/<part>.{arrayrecord,npz,json}`; returns the part's counts."""
    from array_record.python.array_record_module import ArrayRecordWriter

    start = time.perf_counter()
    comp, task, root = job["component"], job["task"], job["cache_dir"]
    tok = _WORKER["tokenizer"]
    filters = Filters(**job["filters"])
    dtype = np.dtype(job["dtype"])
    source = open_source(comp["format"], [Piece(**p) for p in task["pieces"]], text_field=comp["text_field"],
                         text_split=comp["text_split"])
    base = os.path.join(root, task["component"], task["part"])
    writer = ArrayRecordWriter(f"{base}.arrayrecord.tmp", C.WRITER_OPTIONS)
    hashes: list[int] = []
    tokens: list[int] = []
    nbytes: list[int] = []
    counts: Counter[str] = Counter()
    for i in range(len(source)):
        text = source[i]
        if text is None:
            continue  # unusable: counted (and warned about, with file:line) by the source
        if not text.strip():
            counts["empty"] += 1
            continue
        reason = filters.reject(text)
        if reason:
            counts[reason] += 1
            continue
        ids = tok.encode(text)
        writer.write(np.asarray(ids, dtype).tobytes())
        hashes.append(document_hash(text))
        tokens.append(len(ids))
        nbytes.append(len(text.encode("utf-8", "surrogatepass")))
    writer.close()
    np.savez(f"{base}.tmp.npz", hashes=np.asarray(hashes, np.uint64), tokens=np.asarray(tokens, np.int64),
             nbytes=np.asarray(nbytes, np.int64))
    os.replace(f"{base}.arrayrecord.tmp", f"{base}.arrayrecord")
    os.replace(f"{base}.tmp.npz", f"{base}.npz")
    result = {"component": task["component"], "part": task["part"], "docs": len(hashes), "tokens": int(sum(tokens)),
              "bytes": int(sum(nbytes)), "items": len(source) + source.static_bad, "bad": source.bad_count,
              "counts": dict(counts), "seconds": time.perf_counter() - start}
    C.write_json_atomic(f"{base}.json", result)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Phase 1 + 2 + 3


def _start_fresh(cache_dir: str, plan: dict[str, Any], overwrite: bool) -> bool:
    """Returns True to resume (same plan on disk); clears or refuses a cache built from different inputs."""
    plan_path = os.path.join(cache_dir, C.PLAN)
    if not os.path.isfile(plan_path):
        if os.path.isdir(cache_dir) and os.listdir(cache_dir):
            raise ConfigError(f"data.cache_dir={cache_dir} exists and is not a maxlm cache; pick an empty or new "
                              "directory")
        return False
    old = C.read_json(plan_path)
    if old.get("fingerprint_sha256") == plan["fingerprint_sha256"]:
        return True
    if not overwrite:
        raise ConfigError(f"data.cache_dir={cache_dir} holds a cache of other inputs (files, tokenizer or cleaning "
                          "changed); pass --overwrite to rebuild it, or choose another data.cache_dir")
    for name in [C.PLAN, C.MANIFEST, C.TOKENIZER] + sorted({t["component"] for t in old.get("tasks", [])}):
        path = os.path.join(cache_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    return False


def prepare_cache(cfg: Config, *, workers: int = 0, overwrite: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Builds (or finishes) the cache in `cfg.data.cache_dir`; returns the manifest (counts per component)."""
    d = cfg.data
    if not d.cache_dir:
        raise ConfigError("data.cache_dir is empty; set where `maxlm data prepare` writes the cache "
                          "(e.g. data.cache_dir=runs/cache)")
    writable_dir(d.cache_dir, "data.cache_dir")  # an existing file or an unwritable place: one line, now
    plan = make_plan(cfg)
    resume = _start_fresh(d.cache_dir, plan, overwrite)
    os.makedirs(d.cache_dir, exist_ok=True)
    if not resume:
        shutil.copyfile(d.tokenizer, os.path.join(d.cache_dir, C.TOKENIZER))
        for name in {t["component"] for t in plan["tasks"]}:
            os.makedirs(os.path.join(d.cache_dir, name), exist_ok=True)
        C.write_json_atomic(os.path.join(d.cache_dir, C.PLAN), plan)
    comps = {c.name: c for c in components(d)}
    done, pending = [], []
    for task in plan["tasks"]:
        marker = os.path.join(d.cache_dir, task["component"], f"{task['part']}.json")
        if os.path.isfile(marker):
            done.append(C.read_json(marker))
        else:
            pending.append({"task": task, "component": asdict(comps[task["component"]]), "cache_dir": d.cache_dir,
                            "filters": {"min_chars": d.min_doc_chars, "max_chars": d.max_doc_chars,
                                        "max_non_text_ratio": d.max_non_text_ratio},
                            "dtype": plan["fingerprint"]["dtype"]})
    if done:
        log.info("data prepare: resuming, %d of %d parts already done", len(done), len(plan["tasks"]))
    done += _run_pending(pending, d.tokenizer, workers or d.prepare_workers or os.cpu_count() or 1, progress)
    return _finish(cfg, plan, done)


def _run_pending(pending: list[dict[str, Any]], tokenizer: str, workers: int, progress: bool) -> list[dict]:
    from tqdm import tqdm

    results = []
    level = logging.getLogger("maxlm").getEffectiveLevel()
    bar = tqdm(total=len(pending), unit="part", disable=not progress or not pending, desc="tokenizing")
    start, tokens = time.perf_counter(), 0
    try:
        if workers <= 1 or len(pending) <= 1:
            _init_worker(tokenizer, level)
            results_iter: Any = map(_run_task, pending)
            pool = None
        else:
            # spawn, not fork: the parent may hold threads (jax, grain) that a forked child would inherit locked
            pool = multiprocessing.get_context("spawn").Pool(min(workers, len(pending)), _init_worker,
                                                            (tokenizer, level))
            results_iter = pool.imap_unordered(_run_task, pending)
        for r in results_iter:
            results.append(r)
            tokens += r["tokens"]
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.3g}")
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        bar.close()
    return results


def _finish(cfg: Config, plan: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Phase 3: global exact dedup, bad-data limits, the manifest."""
    d = cfg.data
    order = {(t["component"], t["part"]): i for i, t in enumerate(plan["tasks"])}
    parts = sorted(parts, key=lambda r: order[(r["component"], r["part"])])
    names = list(dict.fromkeys(t["component"] for t in plan["tasks"]))
    items = sum(r["items"] for r in parts)
    bad = sum(r["bad"] for r in parts)
    if items and bad / items > d.max_bad_fraction:
        raise ConfigError(f"data: {bad} of {items} items ({bad / items:.1%}) are unreadable or malformed, more than "
                          f"data.max_bad_fraction={d.max_bad_fraction} (warnings above name them); fix the data or "
                          "raise the limit")
    hashes = {n: np.concatenate([np.load(os.path.join(d.cache_dir, n, f"{r['part']}.npz"))["hashes"]
                                 for r in parts if r["component"] == n] or [np.zeros(0, np.uint64)]) for n in names}
    every = np.concatenate([hashes[n] for n in names])
    _, first = np.unique(every, return_index=True)
    keep = np.zeros(len(every), bool)
    keep[first] = True
    offset = 0
    threshold = np.uint64(eval_threshold(d.eval_fraction))
    manifest_comps: dict[str, Any] = {}
    for n in names:
        mine = [r for r in parts if r["component"] == n]
        k = keep[offset:offset + len(hashes[n])]
        offset += len(hashes[n])
        np.save(os.path.join(d.cache_dir, n, C.DUPLICATES), np.flatnonzero(~k).astype(np.int64))
        counts: Counter[str] = Counter()
        for r in mine:
            counts.update(r["counts"])
        spec = next(c for c in components(d) if c.name == n).spec()
        manifest_comps[n] = {
            "spec": spec, "parts": [r["part"] for r in mine], "documents": int(k.sum()),
            "tokens": int(sum(r["tokens"] for r in mine)), "bytes": int(sum(r["bytes"] for r in mine)),
            "items": sum(r["items"] for r in mine), "bad": sum(r["bad"] for r in mine),
            "duplicates": int((~k).sum()), "empty": counts.get("empty", 0),
            "filtered": {reason: counts.get(reason, 0) for reason in FILTER_REASONS},
            "eval_documents_at_prepare": int((k & (hashes[n] < threshold)).sum()),
        }
    if sum(c["documents"] for c in manifest_comps.values()) == 0:
        raise ConfigError(f"data: nothing usable remains in {', '.join(names)} ({items} items read, {bad} bad, "
                          "the rest empty or filtered by data.min_doc_chars/max_doc_chars/max_non_text_ratio)")
    manifest = {"version": C.CACHE_VERSION, "tokenizer_sha256": plan["fingerprint"]["tokenizer_sha256"],
                "vocab_size": plan["vocab_size"], "dtype": plan["fingerprint"]["dtype"],
                "filters": C.filter_spec(d), "components": manifest_comps, "skipped": plan["skipped"],
                "fingerprint_sha256": plan["fingerprint_sha256"]}
    C.write_json_atomic(os.path.join(d.cache_dir, C.MANIFEST), manifest)
    return manifest
