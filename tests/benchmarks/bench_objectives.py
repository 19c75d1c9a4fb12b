"""Step time and compiled peak memory of every objective on one model, alternating in one run.

Run: .venv/bin/python tests/benchmarks/bench_objectives.py [--config demo] [--rounds 2] [--steps 10] [key=value ...]

Each round runs `maxlm bench CONFIG --json` once per variant (the LM step of pretraining and SFT, the same with LoRA, DPO with a frozen
reference, DPO with precomputed reference log-probs, DPO with LoRA and `dpo.reference=base`, reward model), one after
the other, so a shared machine's load falls on all of them alike. Every variant uses synthetic data of the same
shape (the step, not the input pipeline, is measured); a preference batch row holds the pairs of one group. It
prints one line per measurement, then a table of medians with the ratio to the LM (pretraining/SFT) step. Not part of
`make test`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

# The SFT step is the pretraining step over a batch whose loss weights mask the prompt (the same LmBatch, the same
# program; `train.objective=sft` only insists on SFT rows), so `lm` stands for both on synthetic data.
VARIANTS = {
    "lm": [],
    "lm+lora": ["lora.enabled=true", "lora.rank=8"],
    "dpo frozen": ["train.objective=dpo", "dpo.reference=frozen"],
    "dpo precomputed": ["train.objective=dpo", "dpo.reference=precomputed"],
    "dpo+lora base": ["train.objective=dpo", "lora.enabled=true", "lora.rank=8", "dpo.reference=base"],
    "reward": ["train.objective=reward", "model.head=scalar", "dpo.reference=none", "dpo.loss_type=simpo"],
}


def run_one(config: str, extra: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="maxlm-bench-") as run_dir:
        cmd = [sys.executable, "-m", "maxlm.cli", "bench", config, "data.source=synthetic", f"run_dir={run_dir}",
               *extra, "--steps", str(steps), "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    names = args.variants.split(",")
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, int] = {}
    for r in range(args.rounds):
        for name in names:
            res = run_one(args.config, VARIANTS[name] + args.overrides, args.steps)
            times[name].append(res["step_s_median"])
            peaks[name] = res["peak_bytes_per_device"]
            print(f"round {r + 1} {name:16s} {res['step_s_median']:.3f} s/step  peak {res['peak_bytes_per_device'] / 1e6:.1f} MB"
                  f"/device ({res['peak_bytes_source']})  compile {res['compile_s']:.1f} s", flush=True)
    base = statistics.median(times["lm"]) if "lm" in times else None
    print(f"\n| variant | s/step (median of {args.rounds}) | vs LM/SFT step | peak MB/device |\n|---|---|---|---|")
    for name in names:
        t = statistics.median(times[name])
        ratio = f"{t / base:.2f}x" if base else "-"
        print(f"| {name} | {t:.3f} | {ratio} | {peaks[name] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
