"""`maxlm plan sweep`: the configs of an IsoFLOP sweep (Hoffmann et al. 2022, Approach 2), ready for `maxlm train`.

For each budget C (law units, 6ND), `points` model sizes spaced geometrically from N_opt / span to N_opt x span
around the law's optimum, each trained on D = C / (6 N) tokens, so every run of a budget spends the same compute
and the fit can read the IsoFLOP parabola off them. Batch, learning rate and warmup come from the same rules as a
plan, so the sweep and the final run are trained alike; that matters because a scaling law fitted on badly tuned
small runs extrapolates the tuning error.

sweep -> `maxlm train` each config -> `maxlm plan fit runs/sweep` -> `maxlm plan --law fitted.json ...`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from maxlm.config import ConfigError, config_to_yaml
from maxlm.plan.laws import DEFAULT_LAW, Law, load_law, optimum
from maxlm.plan.planner import DEFAULT_SEQ_LEN, DEFAULT_VOCAB, Plan, PlanRequest, make_plan, plan_to_config


@dataclass(frozen=True)
class SweepRun:
    budget: float
    config_path: str
    run_dir: str
    plan: Plan


def _tag(x: float) -> str:
    """1e17 -> '1e17', 3e17 -> '3e17', 2.5e7 -> '25M' (file-name friendly)."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if x >= div:
            return f"{x / div:.3g}{suffix}".replace(".", "p")
    return f"{x:.3g}".replace(".", "p")


def _budget_tag(c: float) -> str:
    mant, exp = f"{c:.2e}".split("e")
    mant = mant.rstrip("0").rstrip(".").replace(".", "p")
    return f"{mant}e{int(exp)}"


def sweep_sizes(law: Law, budget: float, points: int, span: float) -> list[float]:
    """Target parameter counts: geometric from N_opt / span to N_opt x span."""
    n0 = optimum(law, budget).n
    if points == 1:
        return [n0]
    return [n0 * span ** (2 * i / (points - 1) - 1) for i in range(points)]


def plan_sweep(budgets: list[float], *, points: int = 5, span: float = 4.0, law: str = DEFAULT_LAW,
               vocab: int = DEFAULT_VOCAB, seq_len: int = DEFAULT_SEQ_LEN, chips: int | None = None,
               remat: str = "full", out_dir: str = "sweep",
               runs_dir: str = "runs/sweep") -> list[SweepRun]:
    """Plans every run of the sweep (nothing written yet); duplicate shapes within a budget are dropped."""
    if not budgets:
        raise ConfigError("--budgets needs at least one budget, e.g. --budgets 1e17,3e17,1e18")
    if points < 3:
        raise ConfigError(f"--points must be >= 3 so each budget can be fitted with a parabola, got {points}")
    if span <= 1:
        raise ConfigError(f"--span must be > 1 (sizes go from N_opt/span to N_opt*span), got {span:g}")
    the_law = load_law(law)
    out: list[SweepRun] = []
    for c in budgets:
        seen: set[tuple[int, int]] = set()
        this_budget: list[SweepRun] = []
        for target in sweep_sizes(the_law, c, points, span):
            # The planner sizes a model for N_opt(C); here the size is the sweep's, so plan at the
            # tokens-per-parameter that puts N at the target: R = C / (6 N^2).
            ratio = c / (6.0 * target * target)
            req = PlanRequest(compute=c, law=law, vocab=vocab, seq_len=seq_len, tokens_per_param=ratio, chips=chips,
                              remat=remat)
            try:
                plan = make_plan(req)
            except ConfigError as e:
                if "smallest decoder" in str(e):
                    continue  # below the smallest decoder at this vocabulary: the other sizes may still fit
                raise
            key = (plan.shape.model.n_layers, plan.shape.model.d_model)
            if key in seen:
                continue
            seen.add(key)
            name = f"C{_budget_tag(c)}_N{_tag(plan.shape.law_params)}"
            this_budget.append(SweepRun(c, os.path.join(out_dir, f"{name}.yml"), os.path.join(runs_dir, name), plan))
        if len(this_budget) < 3:
            raise ConfigError(f"budget {c:.3g}: only {len(this_budget)} distinct model sizes fit (the vocabulary of "
                              f"{vocab} dominates small models); raise the budget, lower --vocab or narrow --span")
        out += this_budget
    return out


def write_sweep(runs: list[SweepRun], out_dir: str, data_path: str = "", tokenizer: str = "") -> str:
    """Writes one YAML per run plus `sweep.csv` (what each config is); returns the CSV path."""
    os.makedirs(out_dir, exist_ok=True)
    configs = [plan_to_config(r.plan, r.run_dir, data_path, tokenizer) for r in runs]  # all errors before writing
    for r, cfg in zip(runs, configs):
        with open(r.config_path, "w") as f:
            f.write(f"# maxlm plan sweep: budget {r.budget:.3g} FLOPs (6ND), {r.plan.shape.law_params:,} params, "
                    f"{r.plan.tokens:,} tokens\n")
            f.write(config_to_yaml(cfg))
    index = os.path.join(out_dir, "sweep.csv")
    with open(index, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "run_dir", "budget", "N", "D", "steps", "global_batch_rows", "lr"])
        for r in runs:
            w.writerow([r.config_path, r.run_dir, f"{r.budget:.6g}", r.plan.shape.law_params, r.plan.tokens,
                        r.plan.steps, r.plan.rows, f"{r.plan.lr:.4g}"])
    return index
