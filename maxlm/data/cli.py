"""`maxlm data ...` and `maxlm bench-data`: argument parsing and printing only (the work is in prepare/bench)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from maxlm.config import Config, load_config, resolve_config_path


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML path or preset name (e.g. stdlib_demo, tiny)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.cache_dir=runs/cache")


def _load(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config), args.overrides)


def _logging(quiet: bool) -> None:
    """Warnings (bad files, skipped sources) and progress lines go to stderr; stdout carries only the result."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("maxlm").setLevel(logging.WARNING if quiet else logging.INFO)


def _summary_lines(manifest: dict[str, Any], cache_dir: str) -> list[str]:
    lines = [f"cache: {cache_dir} (tokenizer vocab {manifest['vocab_size']}, tokens as {manifest['dtype']})"]
    head = f"{'source':<16}{'documents':>11}{'tokens':>14}{'bytes':>15}{'bad':>7}{'dups':>7}{'empty':>7}" \
           f"{'short':>7}{'long':>7}{'nontext':>8}"
    lines.append(head)
    for name, c in manifest["components"].items():
        f = c["filtered"]
        lines.append(f"{name:<16}{c['documents']:>11,}{c['tokens']:>14,}{c['bytes']:>15,}{c['bad']:>7}"
                     f"{c['duplicates']:>7}{c['empty']:>7}{f['too_short']:>7}{f['too_long']:>7}{f['non_text']:>8}")
    for name, why in manifest.get("skipped", {}).items():
        lines.append(f"{name:<16} skipped: {why}")
    return lines


def cmd_prepare(args: argparse.Namespace) -> int:
    from maxlm.data.prepare import prepare_cache

    cfg = _load(args)
    _logging(args.json)
    manifest = prepare_cache(cfg, workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    if args.json:
        print(json.dumps(manifest))
    else:
        print("\n".join(_summary_lines(manifest, cfg.data.cache_dir)))
        print(f"train from it with: data.cache_dir={cfg.data.cache_dir}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Draws batches as training would and reports the realised mixture and fill rate (and decodes one row)."""
    from maxlm.data.pipeline import build_dataset, tokenizer_path
    from maxlm.data.tokenizer import load_tokenizer

    cfg = _load(args)
    _logging(args.json)
    it = iter(build_dataset(cfg.data, vocab_size=cfg.model.vocab_size, batch_size=cfg.train.global_batch_size,
                            seed=cfg.seed, total_steps=max(cfg.train.steps, 1)))
    try:
        for _ in range(args.batches):
            batch = next(it)
        stats = it.stats()
    finally:
        it.close()
    if args.json:
        print(json.dumps(stats))
        return 0
    for k, v in stats.items():
        print(f"{k:>28}: {v:.4f}")
    path = tokenizer_path(cfg.data)
    if path:
        row = batch["inputs"][0][batch["inputs_segment_ids"][0] > 0]
        print("first row of the last batch:\n" + load_tokenizer(path).decode(row[: args.show_tokens]))
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="maxlm data", description="Data preparation: the pre-tokenized cache.")
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="clean, dedup and tokenize the config's sources into data.cache_dir "
                                          "(parallel; rerun to resume an interrupted prepare)")
    _config_args(prep)
    prep.add_argument("--workers", type=int, default=0, help="processes (default: data.prepare_workers, else one "
                                                             "per core)")
    prep.add_argument("--overwrite", action="store_true", help="rebuild a cache prepared from other inputs")
    prep.add_argument("--json", action="store_true", help="print the manifest as JSON")
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(fn=cmd_prepare)
    sample = sub.add_parser("sample", help="draw batches as training would: realised mixture and fill rate")
    _config_args(sample)
    sample.add_argument("--batches", type=int, default=20)
    sample.add_argument("--show-tokens", type=int, default=200)
    sample.add_argument("--json", action="store_true")
    sample.set_defaults(fn=cmd_sample)
    args = p.parse_args(argv)
    return args.fn(args)


def bench_main(argv: list[str]) -> int:
    from maxlm.data.bench import bench_data

    p = argparse.ArgumentParser(prog="maxlm bench-data",
                                description="Input-pipeline throughput: the on-the-fly pipeline with grain worker "
                                            "processes, building the cache, and reading it.")
    _config_args(p)
    p.add_argument("--batches", type=int, default=100, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="grain prefetch processes for the on-the-fly pipeline")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cfg = _load(args)
    _logging(True)
    result = bench_data(cfg, batches=args.batches, warmup=args.warmup, workers=args.workers)
    if args.json:
        print(json.dumps(result))
        return 0
    for section, value in result.items():
        if isinstance(value, dict):
            print(f"{section}:")
            for k, v in value.items():
                print(f"  {k:>20}: {v:,.1f}" if isinstance(v, float) else f"  {k:>20}: {v}")
        else:
            print(f"{section}: {value}")
    return 0
