"""The planner's memory model (maxlm/plan/memory.py) against XLA's peak, compiled for TPU (or GPU) targets here.

    python tests/benchmarks/bench_memory_calibration.py [small|large] [--target=h100x8] [--json]

Each point compiles the real train step (`maxlm compile`) and sets XLA's peak bytes per device beside
`estimate_for_config` for exactly that config; the model is calibrated when every ratio is within 15%.
`small` (tpu-v4:2x2x2) is the grid tests/test_memory_calibration.py keeps; `large` (tpu-v5p:2x2x2) uses ~1B-parameter
models (2-4 min a compile on a loaded 2-core host). `--target=h100x8` compiles the same points for 8 H100s.
Needs libtpu (`pip install 'maxlm[tpu-compile]'`).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from maxlm.compile.cli import compile_for_target  # noqa: E402
from maxlm.compile.program import for_target  # noqa: E402
from maxlm.compile.targets import parse_target  # noqa: E402
from maxlm.config import load_config, resolve_config_path  # noqa: E402
from maxlm.plan.memory import estimate_for_config  # noqa: E402

# Small: one layer's saved tensors, its backward's working set, the logits and the state all weigh enough that a
# wrong term shows (seq_len 512 so XLA attention's T x T buffers count, as they do at real lengths), and each
# compile takes seconds. Large: ~1B parameters at seq_len 2048, where the attention buffers dominate.
DENSE_SMALL = ["model.vocab_size=4096", "model.d_model=256", "model.n_layers=4", "model.n_heads=4",
               "model.n_kv_heads=2", "model.ffn_dim=768", "data.seq_len=512"]
MOE_SMALL = DENSE_SMALL + ["model.ffn=moe", "model.num_experts=8", "model.experts_per_token=2", "model.ffn_dim=384"]
DENSE_LARGE = ["model.vocab_size=32000", "model.d_model=2048", "model.n_layers=16", "model.n_heads=16",
               "model.n_kv_heads=8", "model.ffn_dim=5632", "data.seq_len=2048"]
MOE_LARGE = DENSE_LARGE + ["model.ffn=moe", "model.num_experts=8", "model.experts_per_token=2", "model.ffn_dim=2048",
                           "model.n_layers=8"]
MESHES = {"fsdp8": ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"],
          "d2f2t2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
          "f4t2": ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
          "e4f2": ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=1", "mesh.expert=4"]}


def grid(size: str, target: str = "") -> list[tuple[str, str, list[str]]]:
    """(name, target, overrides) of every point (8-device targets: the meshes below multiply to 8)."""
    dense, moe = (DENSE_SMALL, MOE_SMALL) if size == "small" else (DENSE_LARGE, MOE_LARGE)
    rows = ["train.global_batch_size=16"] if size == "small" else ["train.global_batch_size=32"]
    target = target or ("tpu-v4:2x2x2" if size == "small" else "tpu-v5p:2x2x2")
    points = []
    for remat in ("none", "dots", "full"):
        for mesh in ("fsdp8", "d2f2t2"):
            points.append((f"dense/{remat}/{mesh}", target, dense + rows + MESHES[mesh] + [f"model.remat={remat}"]))
    for remat in ("none", "full"):
        for mesh in ("fsdp8", "e4f2"):
            points.append((f"moe/{remat}/{mesh}", target, moe + rows + MESHES[mesh] + [f"model.remat={remat}"]))
    return points


def measure(target: str, overrides: list[str], config: str = "tiny") -> dict[str, float]:
    """XLA's peak and the estimate for `config` (a preset or YAML) with `overrides`, compiled for `target`."""
    cfg = load_config(resolve_config_path(config), overrides)
    report = compile_for_target(cfg, target)
    est = estimate_for_config(for_target(cfg, parse_target(target)), report["mesh"], report["platform"]).total
    peak = report["peak_bytes_per_device"]
    return {"xla_peak_bytes_per_device": peak, "estimate_bytes_per_device": est, "ratio": est / peak,
            "compile_s": report["compile_s"], "argument": report["argument_bytes_per_device"],
            "temp": report["temp_bytes_per_device"], "output": report["output_bytes_per_device"],
            "alias": report["alias_bytes_per_device"], "mesh": report["mesh"]}


def main(argv: list[str]) -> int:
    """`small` / `large`: the grid; `preset NAME key=value ... --target=T`: one preset (the closing table)."""
    size = argv[0] if argv and not argv[0].startswith("-") else "small"
    target = next((a.split("=", 1)[1] for a in argv if a.startswith("--target=")), "")
    if size == "preset":
        r = measure(target, [a for a in argv[2:] if "=" in a and not a.startswith("--")], argv[1])
        print(json.dumps(r | {"point": argv[1], "target": target}))
        return 0
    rows = []
    for name, target, overrides in grid(size, target):
        r = measure(target, overrides) | {"point": name, "target": target}
        rows.append(r)
        print(f"{name:22s} {target:14s} XLA {r['xla_peak_bytes_per_device'] / 2**20:9.1f} MiB  estimate "
              f"{r['estimate_bytes_per_device'] / 2**20:9.1f} MiB  ratio {r['ratio']:.3f}  compile "
              f"{r['compile_s']:.1f} s  (args {r['argument'] / 2**20:.1f}, temp {r['temp'] / 2**20:.1f} MiB)",
              flush=True)
    if "--json" in argv:
        print(json.dumps(rows))
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst |ratio - 1| = {worst:.3f}")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
