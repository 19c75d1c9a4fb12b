"""The planner's memory model (maxlm/plan/memory.py) against XLA's peak on the small calibration grid.

Points of tests/benchmarks/bench_memory_calibration.py's `small` grid (dense and MoE, remat none/dots/full, meshes
fsdp8, d2f2t2 and e4f2) are compiled for a TPU v4 2x2x2 slice from this CPU host, and `estimate_for_config` for
exactly that config must be within 15% of XLA's peak bytes per device. (v4, not v5e: v5e's memory-space assignment
keeps up to ~110 MiB of a program in its 128 MiB VMEM, a third of these small peaks; at real sizes that is noise.)
The grid is the benchmark's own list (one source). Each compile takes 10-40 s on a 2-core host, so the default
suite checks three points that between them exercise every term of the model (no remat with tensor parallelism,
`dots` with fsdp, MoE with expert parallelism under `full`); MAXLM_CALIBRATION_GRID=1 checks all ten, and
`python tests/benchmarks/bench_memory_calibration.py large` runs the ~1B models on v5p.
Needs libtpu (`maxlm[tpu-compile]`, which the test extra installs); skipped with the reason without it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from benchmarks.bench_memory_calibration import grid, measure

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
TOLERANCE = 0.15
DEFAULT_POINTS = ("dense/none/d2f2t2", "dense/dots/fsdp8", "moe/full/e4f2")
POINTS = [p for p in grid("small") if os.environ.get("MAXLM_CALIBRATION_GRID") == "1" or p[0] in DEFAULT_POINTS]

pytestmark = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: pip install 'maxlm[tpu-compile]'")


def test_the_default_points_are_in_the_grid() -> None:
    assert set(DEFAULT_POINTS) <= {p[0] for p in grid("small")}


@pytest.mark.parametrize("name,target,overrides", POINTS, ids=[p[0] for p in POINTS])
def test_estimate_is_within_15_percent_of_xla_peak(name: str, target: str, overrides: list[str]) -> None:
    r = measure(target, overrides)
    assert abs(r["ratio"] - 1) <= TOLERANCE, (
        f"{name} on {target}: estimate {r['estimate_bytes_per_device'] / 2**20:.1f} MiB vs XLA peak "
        f"{r['xla_peak_bytes_per_device'] / 2**20:.1f} MiB (ratio {r['ratio']:.3f})")
