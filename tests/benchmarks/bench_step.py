"""Train-step throughput of the shipped small configs on the visible devices (8 fake CPU devices by default).

Run: .venv/bin/python tests/benchmarks/bench_step.py [--steps N] [CONFIG ...]
Prints one JSON line per config: `maxlm bench --json` plus the config name and mesh (or the error of a config
that failed, e.g. out of memory, and goes on). Not part of `make test`. GPU figures: tests/benchmarks/gpu.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DEFAULT = [("tiny", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
           ("tiny", ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"]),
           ("demo", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("configs", nargs="*", help="CONFIG or CONFIG:key=value,key=value")
    args = p.parse_args()
    runs = [(c.split(":")[0], c.split(":")[1].split(",") if ":" in c else []) for c in args.configs] or DEFAULT
    env = os.environ.copy()
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    for name, overrides in runs:
        out = subprocess.run([sys.executable, "-m", "maxlm.cli", "bench", name, *overrides, "--steps",
                              str(args.steps), "--json"], capture_output=True, text=True, env=env)
        if out.returncode != 0:  # e.g. out of memory: report it and go on with the other configs
            tail = (out.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            result = {"error": f"exit {out.returncode}: {tail[:300]}"}
        else:
            result = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps({"config": name, "overrides": overrides} | result), flush=True)


if __name__ == "__main__":
    main()
