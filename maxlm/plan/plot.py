"""`maxlm plan fit --plot out.png`: IsoFLOP curves (loss against parameters, one colour per budget) with each
budget's parabola vertex, the fitted law's IsoFLOP curves L(N, C/6N) dashed, and its optimum N_opt(C) marked:
the figure of Hoffmann et al. 2022 Fig. 3 (left), drawn from the user's runs."""

from __future__ import annotations

import math

import numpy as np

from maxlm.config import ConfigError
from maxlm.plan.fit import IsoFlopFit, RunPoint, group_budgets
from maxlm.plan.laws import ChinchillaLaw


def plot_isoflops(runs: list[RunPoint], law: ChinchillaLaw, iso: IsoFlopFit, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = group_budgets(runs)
    cmap = plt.get_cmap("viridis")
    interior = law.interior_problem() is None
    for i, g in enumerate(groups):
        color = cmap(i / max(1, len(groups) - 1))
        c = math.exp(float(np.mean(np.log([r.c for r in g]))))
        ns = np.array([r.n for r in g])
        ax.scatter(ns, [r.loss for r in g], color=color, s=18, label=f"C = {c:.2g}", zorder=3)
        lo, hi = ns.min() / 1.5, ns.max() * 1.5
        grid = np.geomspace(lo, hi, 100)
        ax.plot(grid, [law.loss(n, c / (6 * n)) for n in grid], "--", color=color, lw=1)
        if interior:
            n_opt, d_opt = law.closed_form(c)
            if lo <= n_opt <= hi:
                ax.plot([n_opt], [law.loss(n_opt, d_opt)], marker="*", color=color, ms=12, mec="k", zorder=4)
    for b in iso.budgets:
        xs = np.linspace(math.log(min(r.n for r in b.runs)), math.log(max(r.n for r in b.runs)), 60)
        c2, c1, c0 = b.coeffs
        ax.plot(np.exp(xs), c2 * xs * xs + c1 * xs + c0, color="0.4", lw=0.8)
        ax.plot([b.n_opt], [b.loss_opt], marker="o", mfc="none", mec="k", ms=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss")
    a = f"a = {law.exponent():.3f}" if interior else "no interior optimum"
    iso_a = f", IsoFLOP a = {iso.a:.3f}" if iso.a is not None else ""
    ax.set_title(f"IsoFLOP profiles: fitted law (dashed, * = optimum; {a}{iso_a})", fontsize=9)
    ax.legend(fontsize=7, title="budget (6ND FLOPs)", title_fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
