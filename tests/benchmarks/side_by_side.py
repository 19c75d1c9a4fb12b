"""maxlm against MaxText on the identical model, alternating in one run, with the speed ratio.

Run: .venv/bin/python tests/benchmarks/side_by_side.py [--maxtext VENV_OR_PYTHON] [--before MAXLM_TREE]
         [--variants dense,moe] [--rounds 3] [--steps 20]

Each round runs, per variant, maxlm (`maxlm bench --json`: the median step after compiling), then the optional
`--before` maxlm source tree (the same command with that tree first on PYTHONPATH), then MaxText (its pre-training
script on synthetic data: the median of its logged `seconds:` per step, its first steps, which compile, dropped),
one after the other, so that a shared machine's load falls on all of them alike. It prints one line per
measurement and a table of medians with `ratio` = MaxText s/step / maxlm s/step (above 1: maxlm is faster).

Both sides get the same model: 2 layers, d_model 256, 4 heads of 64, vocab 1024, seq 128, 16 rows (2 per device
on 8 devices), fsdp 4 x tensor 2, synthetic data, each in its default numerics (MaxText: bf16 compute over f32
weights; maxlm: `model.dtype: auto`). The MoE variant replaces every feed-forward block with 4 experts (top-2) of
width 512, dropless, both with a 0.01 load-balancing loss; MaxText takes its default sparse-matmul path.
MaxText 0.2.5 needs Python >= 3.12 (`python3.12 -m venv /tmp/mt && /tmp/mt/bin/pip install "maxtext[tpu]"`); on a
machine without a TPU it runs on the CPU with JAX_PLATFORMS=cpu. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEVICES = 8
COMMON_MAXLM = ["model.n_layers=2", "model.d_model=256", "model.n_heads=4", "model.n_kv_heads=4", "model.head_dim=64",
                "model.vocab_size=1024", "model.ffn_dim=512", "data.seq_len=128", "data.source=synthetic",
                "train.global_batch_size=16", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "mesh.expert=1"]
MOE_MAXLM = ["model.ffn=moe", "model.num_experts=4", "model.experts_per_token=2", "model.moe_ffn_dim=512",
             "model.load_balance_coef=0.01", "model.router_z_coef=0.0"]
COMMON_MAXTEXT = ["dataset_type=synthetic", "per_device_batch_size=2", "max_target_length=128", "base_emb_dim=256",
                  "base_mlp_dim=512", "base_num_query_heads=4", "base_num_kv_heads=4", "head_dim=64",
                  "base_num_decoder_layers=2", "vocab_size=1024", "ici_fsdp_parallelism=4",
                  "ici_tensor_parallelism=2", "hardware=cpu", "enable_checkpointing=false",
                  "skip_jax_distributed_system=true", "enable_tensorboard=false"]
MOE_MAXTEXT = ["num_experts=4", "num_experts_per_tok=2", "base_moe_mlp_dim=512", "load_balance_loss_weight=0.01"]
VARIANTS = {"dense": ([], []), "moe": (MOE_MAXLM, MOE_MAXTEXT)}
STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")


def cpu_env(pythonpath: str | None = None) -> dict[str, str]:
    env = os.environ.copy()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TPU_SKIP_MDS_QUERY", "1")
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def run_maxlm(python: str, tree: str | None, variant: str, steps: int) -> dict:
    """`maxlm bench` in a fresh process; `tree` puts another maxlm checkout first on the path."""
    cmd = [python, "-m", "maxlm", "bench", "tiny", *COMMON_MAXLM, *VARIANTS[variant][0], "--steps", str(steps),
           "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(tree), cwd=tree or None)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"step_s": r["step_s_median"], "compile_s": r["compile_s"], "dtype": r.get("compute_dtype", "?")}


def maxtext_python(path: str) -> str:
    """A MaxText install given as a venv directory or its python executable."""
    p = Path(path)
    return str(p / "bin" / "python") if p.is_dir() else str(p)


def run_maxtext(python: str, variant: str, steps: int, skip: int) -> dict:
    """MaxText's pre-training script; the median of its per-step `seconds:` after the first `skip` steps."""
    find = subprocess.run([python, "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
                          capture_output=True, text=True, env=cpu_env())
    if find.returncode != 0:
        return {"error": f"no maxtext importable by {python}"}
    base_yml = os.path.join(find.stdout.strip(), "configs", "base.yml")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, "-m", "maxtext.trainers.pre_train.train", base_yml, f"run_name=sbs_{variant}",
               f"base_output_directory={tmp}", f"steps={steps + skip}", *COMMON_MAXTEXT, *VARIANTS[variant][1]]
        out = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(), cwd=tmp)
    times = [(int(s), float(t)) for s, t in STEP_LINE.findall(out.stdout + out.stderr)]
    if out.returncode != 0 or len(times) <= skip:
        return {"error": f"exit {out.returncode}: {(out.stderr.strip().splitlines() or ['?'])[-1][:300]}"}
    return {"step_s": statistics.median(t for s, t in times if s >= skip)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--maxtext", help="MaxText venv directory or python executable (omit: maxlm only)")
    p.add_argument("--before", help="another maxlm source tree to measure beside this one (e.g. main)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs maxlm (default: this one)")
    p.add_argument("--variants", default="dense,moe")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--maxtext-skip", type=int, default=3, help="MaxText's first steps to drop (compile, warm-up)")
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    here = str(Path(__file__).resolve().parents[2])
    sides = [("maxlm", lambda v: run_maxlm(args.python, here, v, args.steps))]
    if args.before:
        sides.append(("maxlm_before", lambda v: run_maxlm(args.python, os.path.abspath(args.before), v, args.steps)))
    if args.maxtext:
        mt = maxtext_python(args.maxtext)
        sides.append(("maxtext", lambda v: run_maxtext(mt, v, args.steps, args.maxtext_skip)))
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for v in variants:
            for name, fn in sides:
                res = fn(v)
                print(json.dumps({"round": r, "variant": v, "side": name} | res), flush=True)
                if "step_s" in res:
                    results.setdefault((v, name), []).append(res["step_s"])
    names = [n for n, _ in sides]
    print("\n| variant | " + " | ".join(f"{n} s/step" for n in names) + " | ratio (MaxText / maxlm) |")
    print("|---|" + "---|" * (len(names) + 1))
    for v in variants:
        med = {n: statistics.median(results[(v, n)]) if (v, n) in results else None for n in names}
        cells = [f"{med[n]:.3f}" if med[n] else "n/a" for n in names]
        ratio = f"{med['maxtext'] / med['maxlm']:.2f}x" if med.get("maxtext") and med.get("maxlm") else "n/a"
        if med.get("maxtext") and med.get("maxlm_before"):
            ratio += f" (before: {med['maxtext'] / med['maxlm_before']:.2f}x)"
        print(f"| {v} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
