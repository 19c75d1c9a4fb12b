"""`maxlm lora`: what to do with a LoRA run's adapters besides training them.

    maxlm lora merge RUN OUT [--hf] [--dtype bfloat16]   base + adapters -> one model (maxlm checkpoint, or HF dir)
    maxlm lora export-peft RUN OUT                        adapters -> PEFT (adapter_config.json + safetensors)

RUN is a LoRA run directory, its checkpoints/ or one step. Importing a PEFT adapter is a config key:
`lora.load_adapter_from=DIR` (to continue training it, or to evaluate/generate with it).
"""

from __future__ import annotations

import argparse
import sys
import time

from maxlm.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxlm lora", description="LoRA adapters: merge into the base, export to PEFT.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="fold the adapters into the base weights (W + alpha/r * A B)")
    m.add_argument("run", help="LoRA run directory, checkpoint directory or step directory")
    m.add_argument("out", help="new directory: a maxlm checkpoint (OUT/0), or with --hf a Hugging Face model")
    m.add_argument("--hf", action="store_true", help="write a Hugging Face directory (safetensors + config.json)")
    m.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="--hf tensor dtype (default: the model's parameter dtype)")
    e = sub.add_parser("export-peft", help="write the adapters as a PEFT LoRA adapter directory")
    e.add_argument("run")
    e.add_argument("out")
    return p


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        t0 = time.perf_counter()
        if args.command == "merge":
            from maxlm.convert.lora_merge import merge_checkpoint

            out = merge_checkpoint(args.run, args.out, hf=args.hf, dtype=args.dtype)
        else:
            from maxlm.convert.peft import export_peft

            out = export_peft(args.run, args.out)
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
        return 0
    except ConfigError as e:
        print(f"maxlm: error: {e}", file=sys.stderr)
        return 2
