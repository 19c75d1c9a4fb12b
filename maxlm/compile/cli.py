"""`maxlm compile CONFIG [key=value ...] --target TARGET [--slices N] [--json]`.

Exit codes: 0 compiled and fits; 1 a result the user must act on (unknown target, a mesh that does not match the
target's device count, or a step that does not fit in HBM: printed with the numbers); 2 a config mistake or a
missing optional dependency (one line naming the extra to install).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from maxlm.config import ConfigError, load_config, resolve_config_path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxlm compile", description="Compile the real train step for a TPU slice or "
                                "GPU cluster from this machine: XLA's memory per device, whether it fits, FLOPs, "
                                "collectives and compile time, without renting the hardware.")
    p.add_argument("config", help="YAML path or preset name (e.g. llama3-8b)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.fsdp=-1")
    p.add_argument("--target", required=True, help="tpu-v5p:4x4x4, tpu-v5e:8x8, tpu-v6e:16x16, tpu-v4:2x2x2, "
                   "h100x64, a100x8, h200x8, h100:HOSTSxGPUS")
    p.add_argument("--slices", type=int, default=1, help="TPU slices joined over DCN (mesh.dcn_* must match)")
    p.add_argument("--json", action="store_true")
    return p


def compile_for_target(cfg: Any, target_name: str, slices: int = 1) -> dict[str, Any]:
    """Compiles `cfg`'s train step for the target; the report dict (see maxlm.compile.report.analyse).

    Raises MissingExtra (exit 2), ConfigError for the target/mesh (the CLI exits 1)."""
    from maxlm.compile.program import check_mesh, compile_step, for_target
    from maxlm.compile.report import analyse
    from maxlm.compile.targets import compile_devices, parse_target

    target = parse_target(target_name, slices)
    cfg = for_target(cfg, target)
    check_mesh(cfg, target)  # before loading libtpu / the CUDA plugin: a mismatch costs nothing
    compiled = compile_step(cfg, target, compile_devices(target))
    return analyse(cfg, target, compiled)


def main(argv: list[str]) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # the CUDA plugin's "no GPU here" notices: expected
    from maxlm.compile.targets import MissingExtra

    args, extra = parser().parse_known_args(argv)
    cfg = load_config(resolve_config_path(args.config), list(args.overrides) + extra)  # ConfigError: exit 2
    try:
        report = compile_for_target(cfg, args.target, args.slices)
    except MissingExtra:
        raise
    except ConfigError as e:
        print(f"maxlm compile: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # XLA refusing the program: TPU compilers stop when HBM is exhausted
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
            first = next((line for line in text.splitlines() if "memory" in line.lower()), text.splitlines()[0])
            print(f"maxlm compile: does not fit on {args.target}: {first.strip()}", file=sys.stderr)
            return 1
        raise
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        from maxlm.compile.report import render

        print(render(report))
    if not report["fits"]:
        print(f"maxlm compile: does not fit: peak {report['peak_bytes_per_device'] / 2**30:.2f} GiB per device > "
              f"{report['hbm_bytes_per_device'] / 2**30:.2f} GiB HBM of {report['chip']}; shard more (mesh.fsdp, "
              "mesh.tensor), remat more (model.remat=full) or raise train.grad_accum", file=sys.stderr)
        return 1
    return 0
