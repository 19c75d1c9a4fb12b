"""Times `maxlm plan` (target: < 1 s) and `maxlm plan fit` on 100 runs (target: < 10 s on 2 cores).

Run from the repository root: `.venv/bin/python tests/benchmarks/bench_plan.py`. Both are timed as the user runs
them, in a fresh interpreter (imports included), pinned to two cores with `taskset` where it exists.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from maxlm.plan.laws import BUILTIN_LAWS, optimum


def synthetic_csv(path: str, budgets: int = 10, sizes: int = 10, noise: float = 0.005, seed: int = 0) -> None:
    """An IsoFLOP grid of budgets x sizes runs, losses from the Epoch law times log-normal noise."""
    law = BUILTIN_LAWS["epoch"]
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["N", "D", "loss", "C"])
        for c in np.logspace(17, 21, budgets):
            n0 = optimum(law, c).n
            for k in np.geomspace(1 / 4, 4, sizes):
                n, d = n0 * k, c / (6 * n0 * k)
                w.writerow([n, d, law.loss(n, d) * math.exp(rng.normal(0, noise)), c])


def timed(argv: list[str], repeats: int) -> float:
    """Best wall-clock seconds of `repeats` runs of `python -m maxlm.plan.cli ARGV` on (at most) two cores."""
    pin = ["taskset", "-c", "0,1"] if shutil.which("taskset") and os.cpu_count() and os.cpu_count() >= 2 else []
    cmd = pin + [sys.executable, "-m", "maxlm.plan.cli", *argv]
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = os.path.join(tmp, "runs.csv")
        synthetic_csv(runs)
        out = {
            "plan_s": timed(["--compute", "1e21", "--hardware", "h100", "--chips", "64"], 5),
            "plan_days_s": timed(["--hardware", "h100", "--chips", "64", "--days", "7"], 5),
            # MoE: the mesh search adds an expert axis (divisors of E) to fsdp x tensor
            "plan_moe_s": timed(["--compute", "1e23", "--moe", "64,6", "--hardware", "h100", "--chips", "1024"], 5),
            "plan_write_config_s": timed(["--compute", "1e21", "--write-config", os.path.join(tmp, "c.yml")], 2),
            "fit_100_runs_s": timed(["fit", runs, "--out", os.path.join(tmp, "fit.json")], 3),
            "fit_100_runs_no_bootstrap_s": timed(["fit", runs, "--bootstrap", "0"], 3),
        }
    print(json.dumps({k: round(v, 3) for k, v in out.items()}, indent=2))


if __name__ == "__main__":
    main()
