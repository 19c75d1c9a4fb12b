"""`maxlm convert`: Hugging Face <-> maxlm checkpoints.

    maxlm convert from-hf HF_DIR OUT_CKPT [key=value ...]   e.g. model.scan_layers=false model.param_dtype=bfloat16
    maxlm convert to-hf CKPT HF_DIR [--dtype bfloat16] [--max-shard-size 5GB]
    maxlm convert config HF_DIR                             the `model:` section that matches a Hugging Face model
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time

import yaml

from maxlm.config import ConfigError, ModelConfig

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (decimal and binary prefixes both mean powers of 1024, as
    transformers' max_shard_size does for GB)."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB or a byte count")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(unit or " "))


def model_overrides(model: ModelConfig) -> list[str]:
    """The `model.*` overrides that differ from maxlm's defaults (what a config needs to match the model)."""
    default = ModelConfig()
    return [f"model.{f.name}={getattr(model, f.name)}" for f in dataclasses.fields(ModelConfig)
            if getattr(model, f.name) != getattr(default, f.name)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxlm convert", description="Hugging Face <-> maxlm checkpoints (Llama, "
                                "Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE).")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="Hugging Face directory (config.json + safetensors) -> maxlm checkpoint")
    a.add_argument("hf_dir")
    a.add_argument("out", help="new directory; the checkpoint is written as OUT/0")
    a.add_argument("overrides", nargs="*", help="config overrides, e.g. model.scan_layers=false")
    b = sub.add_parser("to-hf", help="maxlm checkpoint (run dir, checkpoint dir or one step) -> Hugging Face directory")
    b.add_argument("checkpoint")
    b.add_argument("out")
    b.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="tensor dtype in the safetensors files (default: the checkpoint's parameter dtype)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    c = sub.add_parser("config", help="print the maxlm `model:` section matching a Hugging Face config.json")
    c.add_argument("hf_dir")
    return p


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except ConfigError as e:
        print(f"maxlm: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.command == "config":
        from maxlm.convert.families import model_config_from_hf, read_hf_config

        model = model_config_from_hf(read_hf_config(args.hf_dir), where=args.hf_dir)
        print(yaml.safe_dump({"model": {k: v for k, v in dataclasses.asdict(model).items()
                                        if v != getattr(ModelConfig(), k)}}, sort_keys=False), end="")
        return 0
    from maxlm.convert import hf

    if args.command == "from-hf":
        step_dir, cfg = hf.from_hf(args.hf_dir, args.out, args.overrides)
        print(f"wrote {step_dir} in {time.perf_counter() - t0:.1f} s")
        overrides = " ".join(model_overrides(cfg.model))
        print(f"train from it: maxlm train CONFIG load_parameters_from={args.out} {overrides}")
        return 0
    out = hf.to_hf(args.checkpoint, args.out, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size))
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0
