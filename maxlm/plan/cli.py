"""`maxlm plan ...`: the planner's command line (`main(argv)` gets everything after `plan`).

    maxlm plan --compute 1e21 [--hardware h100 --chips 64] [--json] [--write-config run.yml]
    maxlm plan --hardware h100 --chips 64 --days 7 [--mfu 0.4]
    maxlm plan fit runs.csv runs/sweep [--out fitted.json] [--plot isoflops.png]
    maxlm plan sweep --budgets 1e17,3e17,1e18 [--points 5] [--out sweep]

Bad input raises `maxlm.config.ConfigError` with one line; the top-level CLI prints it and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from maxlm.config import ConfigError
from maxlm.flops import HARDWARE
from maxlm.plan.laws import BUILTIN_LAWS, DEFAULT_LAW
from maxlm.plan.memory import REMAT_BY_RECOMPUTE
from maxlm.plan.planner import DEFAULT_MFU, DEFAULT_SEQ_LEN, DEFAULT_VOCAB


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as ConfigError (one line, exit 2 upstairs) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r} must be >= 1")
    return v


def _moe(s: str) -> tuple[int, int]:
    try:
        e, k = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} must be E,K (experts, active per token), e.g. 8,2") from None
    return e, k


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} must be comma-separated numbers, e.g. 1e17,3e17,1e18") from None


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--law", default=DEFAULT_LAW,
                   help=f"built-in law ({', '.join(BUILTIN_LAWS)}; default {DEFAULT_LAW}) or a JSON file from "
                        "`maxlm plan fit --out`")
    p.add_argument("--vocab", type=_positive_int, default=DEFAULT_VOCAB,
                   help=f"vocabulary size (default {DEFAULT_VOCAB})")
    p.add_argument("--seq-len", type=_positive_int, default=DEFAULT_SEQ_LEN,
                   help=f"training sequence length (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--remat", default="full", choices=REMAT_BY_RECOMPUTE + ("auto",),
                   help="remat policy for the memory estimate and the config (auto: least recompute that fits)")
    p.add_argument("--data", default="", help="data glob for the written config(s) (default: synthetic data)")
    p.add_argument("--tokenizer", default="", help="sentencepiece model for --data")


def plan_parser() -> _Parser:
    p = _Parser(prog="maxlm plan", description="Turn a compute budget into a compute-optimal model, batch, "
                "learning rate, schedule, wall-clock, memory and mesh, and optionally a maxlm config. "
                "Subcommands: `maxlm plan fit`, `maxlm plan sweep`.")
    p.add_argument("--compute", type=float, help="budget in FLOPs, in the law's C = 6ND units (e.g. 1e21)")
    p.add_argument("--hardware", help=f"chip type: {', '.join(HARDWARE)}")
    p.add_argument("--chips", type=_positive_int, help="number of chips")
    p.add_argument("--days", type=float, help="wall-clock budget in days (with --hardware and --chips)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"model FLOPs utilisation (default {DEFAULT_MFU})")
    p.add_argument("--tokens-per-param", type=float, help="fix D/N instead of the law's optimum")
    p.add_argument("--moe", type=_moe, help="E,K: E experts per layer, K active per token (law N = active params)")
    p.add_argument("--head-dim", type=int, default=0, help="force head_dim (default: 64 below d_model 2048, else 128)")
    p.add_argument("--kv-heads", type=int, default=0, help="force the number of KV heads (default: 8 for 16+ heads)")
    _add_model_flags(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--write-config", metavar="PATH", help="write a maxlm YAML config for the plan")
    p.add_argument("--run-dir", help="run_dir of the written config (default: runs/<config name>)")
    p.add_argument("--verify", action="store_true", help="compile the planned config for the planned hardware "
                   "(maxlm compile; needs --hardware/--chips and the tpu-compile or gpu-compile extra) and set XLA's "
                   "peak memory per device beside the estimate")
    return p


# `--verify` compiles the plan (maxlm.compile, a layer above this library): the top-level CLI passes the function.
Verifier = Callable[[Any, "str | None"], dict[str, Any]]
VERIFY_TOLERANCE = 0.15  # |estimate / XLA peak - 1| beyond this is reported


def fit_parser() -> _Parser:
    p = _Parser(prog="maxlm plan fit", description="Fit L(N, D) = E + A/N^alpha + B/D^beta to finished runs "
                "(Hoffmann et al. 2022 Approach 3, with bootstrap intervals) and IsoFLOP parabolas (Approach 2).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="CSV files with columns N,D,loss[,C], maxlm run directories, or directories of them")
    p.add_argument("--out", metavar="PATH", help="write the fitted law as JSON (use with `maxlm plan --law PATH`)")
    p.add_argument("--json", action="store_true", help="print the fit as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw the IsoFLOP curves and the fitted optimum (needs matplotlib)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples for the intervals (default 500)")
    p.add_argument("--ci", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--starts", default="pairs", choices=("pairs", "all"),
                   help="L-BFGS starts: the 3 best grid points per (alpha, beta) pair (default), or all 4,500")
    return p


def sweep_parser() -> _Parser:
    p = _Parser(prog="maxlm plan sweep", description="Write the configs of an IsoFLOP sweep: model sizes around "
                "each budget's optimum, tokens set by the budget, ready for `maxlm train`.")
    p.add_argument("--budgets", type=_floats, required=True, help="comma-separated budgets in FLOPs (6ND)")
    p.add_argument("--points", type=int, default=5, help="model sizes per budget (default 5)")
    p.add_argument("--span", type=float, default=4.0, help="sizes from N_opt/span to N_opt*span (default 4)")
    p.add_argument("--chips", type=_positive_int, help="devices the runs train on (rows are a multiple of it)")
    _add_model_flags(p)
    p.add_argument("--out", default="sweep", help="directory for the configs (default sweep/)")
    p.add_argument("--runs-dir", default="runs/sweep", help="parent of the runs' run_dir (default runs/sweep)")
    p.add_argument("--json", action="store_true", help="print the sweep as JSON")
    return p


def _write_config(plan: Any, path: str, run_dir: str | None, data: str, tokenizer: str) -> None:
    """Writes the plan's config and checks it the way `maxlm train` will: loads, validates (on the planned chip
    count, when known), same parameter count."""
    from maxlm.config import config_to_yaml, load_config, validate
    from maxlm.flops import count_params
    from maxlm.plan.planner import plan_to_config

    name = os.path.splitext(os.path.basename(path))[0]
    cfg = plan_to_config(plan, run_dir or os.path.join("runs", name), data, tokenizer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# maxlm plan: {plan.compute:.3g} FLOPs (6ND) under law {plan.law.name}; "
                f"{plan.shape.count.total:,} parameters, {plan.tokens:,} tokens\n")
        f.write(config_to_yaml(cfg))
    loaded = load_config(path)
    if plan.request.chips:
        validate(loaded, plan.request.chips)
    assert count_params(loaded.model).total == plan.shape.count.total, "written config's parameter count drifted"


def _plan_main(argv: list[str], verifier: Verifier | None = None) -> int:
    from maxlm.plan.planner import PlanRequest, make_plan
    from maxlm.plan.report import render

    a = plan_parser().parse_args(argv)
    req = PlanRequest(compute=a.compute, hardware=a.hardware, chips=a.chips, days=a.days, mfu=a.mfu, law=a.law,
                      vocab=a.vocab, seq_len=a.seq_len, tokens_per_param=a.tokens_per_param, moe=a.moe,
                      remat=a.remat, head_dim=a.head_dim, kv_heads=a.kv_heads)
    plan = make_plan(req)
    if a.write_config:
        _write_config(plan, a.write_config, a.run_dir, a.data, a.tokenizer)
    if a.verify and verifier is None:
        raise ConfigError("--verify compiles the plan: run it through the `maxlm plan` command")
    verify = verifier(plan, a.run_dir) if a.verify and verifier else None
    if a.json:
        extra = {"verify": verify} if verify else {}
        print(json.dumps(plan.to_dict() | {"config_path": a.write_config} | extra, indent=2))
    else:
        print(render(plan))
        if a.write_config:
            print(f"wrote {a.write_config}: maxlm train {a.write_config}")
        if verify:
            print(f"verify ({verify['target']}): XLA peak {verify['xla_peak_bytes_per_device'] / 2**30:.2f} GiB per "
                  f"device, estimate {verify['estimate_bytes_per_device'] / 2**30:.2f} GiB "
                  f"({verify['ratio']:.2f} x), compiled in {verify['compile_s']:.1f} s")
    if verify and not verify["within_tolerance"]:
        print(f"maxlm plan: warning: the memory estimate is {verify['ratio']:.2f} x XLA's peak (more than "
              f"{VERIFY_TOLERANCE:.0%} off); trust XLA's number", file=sys.stderr)
    return 0


def _fmt_interval(v: float, iv: list[float] | None) -> str:
    return f"{v:.4g}" + (f"  [{iv[0]:.4g}, {iv[1]:.4g}]" if iv else "")


def _fit_main(argv: list[str]) -> int:
    from maxlm.plan.fit import DEFAULT_RESAMPLES, fit_isoflop, fit_report, read_inputs

    a = fit_parser().parse_args(argv)
    resamples = DEFAULT_RESAMPLES if a.bootstrap is None else a.bootstrap
    if resamples < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {resamples}")
    runs = read_inputs(a.inputs)
    report = fit_report(runs, resamples=resamples, ci=a.ci, seed=a.seed, starts=a.starts)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    if a.plot:
        from maxlm.plan.laws import law_from_dict
        from maxlm.plan.plot import plot_isoflops

        plot_isoflops(runs, law_from_dict(report), fit_isoflop(runs), a.plot)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    iv = report["intervals"]
    print(f"fitted L(N, D) = E + A / N^alpha + B / D^beta on {len(runs)} runs "
          f"(Huber delta {report['huber_delta']:g} on log-loss, L-BFGS from {report['starts']} grid starts)")
    if iv:
        print(f"  {report['ci']:.0%} bootstrap intervals from {report['bootstrap_resamples']} resamples in brackets")
    for k in ("E", "A", "B", "alpha", "beta"):
        print(f"  {k:<6}{_fmt_interval(report[k], iv.get(k))}")
    print(f"  N_opt ~ C^a: a = beta/(alpha+beta) = {_fmt_interval(report['a'], iv.get('a'))}")
    if not report["interior_optimum"]:
        print("  WARNING: the fitted law has no interior optimum (a coefficient or exponent is <= 0); "
              "the runs probably do not bracket the compute-optimal size")
    iso = report["isoflop"]
    if iso["budgets"]:
        print("IsoFLOP parabolas (Approach 2): loss vs log N per budget")
        for b in iso["budgets"]:
            print(f"  C = {b['compute']:.3g}: N_opt = {b['n_opt']:.3g} (loss {b['loss_opt']:.4f}, {b['runs']} runs)")
        if iso["a"] is not None:
            print(f"  N_opt ~ C^a across budgets: a = {iso['a']:.3f}")
    else:
        print("IsoFLOP parabolas: none (needs >= 3 model sizes sharing a budget)")
    if a.out:
        print(f"wrote {a.out}: maxlm plan --law {a.out} --compute ...")
    if a.plot:
        print(f"wrote {a.plot}")
    return 0


def _sweep_main(argv: list[str]) -> int:
    from maxlm.plan.report import si
    from maxlm.plan.sweep import plan_sweep, write_sweep

    a = sweep_parser().parse_args(argv)
    runs = plan_sweep(a.budgets, points=a.points, span=a.span, law=a.law, vocab=a.vocab, seq_len=a.seq_len,
                      chips=a.chips, remat=a.remat, out_dir=a.out, runs_dir=a.runs_dir)
    index = write_sweep(runs, a.out, a.data, a.tokenizer)
    if a.json:
        print(json.dumps([{"budget": r.budget, "config": r.config_path, "run_dir": r.run_dir,
                           "params": r.plan.shape.law_params, "tokens": r.plan.tokens, "steps": r.plan.steps}
                          for r in runs], indent=2))
        return 0
    print(f"{'budget':>9}  {'params':>8}  {'layers x d_model':>16}  {'tokens':>8}  {'steps':>7}  config")
    for r in runs:
        m = r.plan.shape.model
        print(f"{r.budget:>9.3g}  {si(r.plan.shape.law_params):>8}  {f'{m.n_layers} x {m.d_model}':>16}  "
              f"{si(r.plan.tokens):>8}  {r.plan.steps:>7,}  {r.config_path}")
    print(f"wrote {len(runs)} configs and {index}. Next:\n"
          f"  for c in {a.out}/*.yml; do maxlm train $c; done\n"
          f"  maxlm plan fit {a.runs_dir} --out fitted.json --plot isoflops.png\n"
          f"  maxlm plan --law fitted.json --compute ...")
    return 0


def main(argv: list[str], verifier: Verifier | None = None) -> int:
    """Dispatches `maxlm plan [fit|sweep] ...`; returns the exit code (errors are ConfigError). `verifier`
    compiles a plan for `--verify` (maxlm.compile.verify.verify_plan)."""
    if argv and argv[0] == "fit":
        return _fit_main(argv[1:])
    if argv and argv[0] == "sweep":
        return _sweep_main(argv[1:])
    return _plan_main(argv, verifier)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
