"""Fit a scaling law to the user's own runs: Hoffmann et al.'s Approach 3, with bootstrap intervals, plus
IsoFLOP parabolas (their Approach 2) when runs share budgets.

Approach 3 as in Hoffmann et al. 2022 (arXiv:2203.15556, Sec. 3.3 and Appendix D.2): with
L(N, D) = E + A N^-alpha + B D^-beta written as exp(LSE(a - alpha log N, b - beta log D, e)) (A = e^a, B = e^b,
E = e^e), minimise  sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i),  delta = 1e-3, with
L-BFGS from the grid alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}
(4,500 starts), keeping the best.

By default L-BFGS runs from the 3 best-ranked (a, b, e) grid points of each of the 25 (alpha, beta) grid pairs:
75 starts, so every exponent region of the grid is still explored, ranked by one vectorised pass over all 4,500
points. `starts="all"` runs from all 4,500 exactly as Hoffmann et al.; on 100 synthetic runs that took ~280 s and
found the same optimum as the 75 starts (~1 s).

The objective is divided by delta, which leaves the minimiser unchanged: Besiroglu et al. 2024 traced part of
Hoffmann et al.'s implausible estimates to an optimizer that stopped early because of the loss scale, and at
delta = 1e-3 the raw Huber sum is ~1e-6, below L-BFGS's default tolerances.

Bootstrap intervals resample the runs with replacement and refit each resample from the full-data optimum (a
resample moves the optimum a little, not to another basin; a grid search per resample would cost 10x more),
~5 ms per refit at 100 runs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from maxlm.config import ConfigError
from maxlm.plan.laws import ChinchillaLaw

log = logging.getLogger(__name__)

HUBER_DELTA = 1e-3
GRID_ALPHA = np.arange(0.0, 2.01, 0.5)
GRID_E = np.arange(-1.0, 1.01, 0.5)
GRID_A = np.arange(0.0, 25.01, 5.0)
STARTS_PER_EXPONENT_PAIR = 3  # default starts: the best (a, b, e) grid points of each (alpha, beta) grid pair
BUDGET_TOLERANCE = 0.1  # runs whose 6ND differ by less than 10% share an IsoFLOP budget


@dataclass(frozen=True)
class RunPoint:
    """One finished run: parameters (the law's N), tokens seen, final loss, and its compute (6ND unless given)."""

    n: float
    d: float
    loss: float
    c: float
    source: str = ""


# ----------------------------------------------------------------------------------------------------------
# Reading runs


def _float(value: str, where: str, allow_nonfinite: bool = False) -> float:
    """A positive number; with `allow_nonfinite` (losses) NaN/Inf are kept, for `read_inputs` to skip the run."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a number") from None
    if allow_nonfinite and not math.isfinite(v):
        return v
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{where}: {value!r} must be a positive finite number")
    return v


def read_csv(path: str) -> list[RunPoint]:
    """Columns N, D, loss and optionally C (case-insensitive; `params`/`tokens` accepted for N/D)."""
    aliases = {"n": "n", "params": "n", "parameters": "n", "d": "d", "tokens": "d", "loss": "loss", "c": "c",
               "compute": "c", "flops": "c"}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ConfigError(f"{path}: empty CSV; expected a header N,D,loss[,C]")
        cols = {aliases[h.strip().lower()]: h for h in reader.fieldnames if h and h.strip().lower() in aliases}
        missing = [k for k in ("n", "d", "loss") if k not in cols]
        if missing:
            raise ConfigError(f"{path}: needs columns N, D, loss (and optionally C); missing "
                              f"{', '.join(k.upper() if k != 'loss' else k for k in missing)}")
        out = []
        for i, row in enumerate(reader, start=2):
            where = f"{path}:{i}"
            n, d = _float(row[cols["n"]], where), _float(row[cols["d"]], where)
            c = _float(row[cols["c"]], where) if "c" in cols and row[cols["c"]].strip() else 6.0 * n * d
            out.append(RunPoint(n, d, _float(row[cols["loss"]], where, allow_nonfinite=True), c, where))
    return out


CONFIG_NAMES = ("config.yaml", "config.yml")
LOSS_KEYS = ("eval_loss", "eval/loss", "loss")  # preferred first: held-out loss when the run logged one


def read_run_dir(path: str) -> RunPoint:
    """A maxlm run directory: N from its saved config (maxlm.flops), tokens = last step x tokens per step, loss
    from the last logged `eval_loss` (else the last training `loss`) in metrics.jsonl."""
    from maxlm.config import load_config
    from maxlm.flops import count_params

    cfg_path = next((os.path.join(path, n) for n in CONFIG_NAMES if os.path.isfile(os.path.join(path, n))), None)
    if cfg_path is None:
        raise ConfigError(f"{path}: no {' or '.join(CONFIG_NAMES)} (is it a maxlm run directory?)")
    cfg = load_config(cfg_path)
    rows = []
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    for key in LOSS_KEYS:  # NaN/Inf are logged as the strings "nan"/"inf" (JSON has no literal for them)
        hits = [r for r in rows if isinstance(r.get(key), (int, float)) or r.get(key) in ("nan", "inf", "-inf")]
        if hits:
            last = hits[-1]
            break
    else:
        raise ConfigError(f"{path}/metrics.jsonl: no logged loss")
    step = max(int(r.get("step", 0)) for r in rows)
    tokens = float(rows[-1].get("tokens", step * cfg.tokens_per_step))
    n = float(count_params(cfg.model).active)
    if tokens <= 0:
        raise ConfigError(f"{path}: the run has not trained any tokens yet")
    return RunPoint(n, tokens, float(last[key]), 6.0 * n * tokens, path)


def read_inputs(paths: Iterable[str]) -> list[RunPoint]:
    """CSV files, run directories, or directories of run directories (e.g. `runs/sweep`); runs whose final loss is
    NaN/Inf (diverged) are skipped with a warning, since no law passes through them."""
    runs = _read_all(paths)
    finite = [r for r in runs if math.isfinite(r.loss)]
    if len(finite) < MIN_RUNS and len(finite) < len(runs):
        raise ConfigError(f"fitting 5 coefficients needs at least {MIN_RUNS} runs with a finite loss, got "
                          f"{len(finite)} ({len(runs) - len(finite)} of {len(runs)} have a NaN/Inf final loss); rerun "
                          "the diverged ones (e.g. with a lower optim.lr) or add runs")
    for r in runs:
        if not math.isfinite(r.loss):
            log.warning("maxlm plan fit: skipping %s: its final loss is %s", r.source, r.loss)
    return finite


MIN_RUNS = 5


def _read_all(paths: Iterable[str]) -> list[RunPoint]:
    out: list[RunPoint] = []
    for p in paths:
        if os.path.isfile(p):
            out += read_csv(p)
        elif os.path.isdir(p):
            if os.path.isfile(os.path.join(p, "metrics.jsonl")):
                out.append(read_run_dir(p))
            else:
                subs = sorted(os.path.join(p, s) for s in os.listdir(p)
                              if os.path.isfile(os.path.join(p, s, "metrics.jsonl")))
                if not subs:
                    raise ConfigError(f"{p}: neither a run directory (metrics.jsonl) nor a directory of run dirs")
                out += [read_run_dir(s) for s in subs]
        else:
            raise ConfigError(f"fit input not found: {p} (give CSV files or maxlm run directories)")
    return out


# ----------------------------------------------------------------------------------------------------------
# Approach 3: the parametric fit


def _objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray, logl: np.ndarray, w: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """sum_i w_i Huber_delta(LSE(a - alpha x_i, b - beta y_i, e) - log L_i) / delta, and its gradient.

    w_i are bootstrap multiplicities (resampling with replacement = integer weights), x = log N, y = log D.
    """
    a, b, e, alpha, beta = theta
    u1, u2 = a - alpha * x, b - beta * y
    m = np.maximum(np.maximum(u1, u2), e)
    p1, p2, p3 = np.exp(u1 - m), np.exp(u2 - m), np.exp(e - m)
    s = p1 + p2 + p3
    r = m + np.log(s) - logl
    absr = np.abs(r)
    hub = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))
    # Elementwise products and sums rather than `@`: these vectors are ~100 long, too short for a BLAS call to pay.
    g = w * np.clip(r, -delta, delta) / s  # dHuber/dr, times the softmax denominators
    g1, g2 = g * p1, g * p2
    grad = np.array([g1.sum(), g2.sum(), (g * p3).sum(), -(g1 * x).sum(), -(g2 * y).sum()]) / delta
    return float((w * hub).sum()) / delta, grad


def _grid() -> np.ndarray:
    """Hoffmann et al.'s 4,500 initialisations as rows (a, b, e, alpha, beta)."""
    a, b, e, al, be = np.meshgrid(GRID_A, GRID_A, GRID_E, GRID_ALPHA, GRID_ALPHA, indexing="ij")
    return np.stack([a.ravel(), b.ravel(), e.ravel(), al.ravel(), be.ravel()], axis=1)


def _grid_values(grid: np.ndarray, x: np.ndarray, y: np.ndarray, logl: np.ndarray, w: np.ndarray,
                 delta: float) -> np.ndarray:
    """The objective at every grid point at once (for ranking starts)."""
    u1 = grid[:, :1] - grid[:, 3:4] * x[None]
    u2 = grid[:, 1:2] - grid[:, 4:5] * y[None]
    u3 = np.broadcast_to(grid[:, 2:3], u1.shape)
    r = np.logaddexp(np.logaddexp(u1, u2), u3) - logl[None]
    absr = np.abs(r)
    return (np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)) * w).sum(axis=1) / delta


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """One BLAS thread while fitting. L-BFGS-B's inner linear algebra is on tiny matrices, where OpenBLAS's thread
    hand-offs cost more than the arithmetic; with jax loaded in the same process (its thread pools compete for the
    cores) we measured one 100-run fit at 14-26 s with two BLAS threads vs 0.9 s with one. Uses threadpoolctl when
    installed; without it the fit is only slower."""
    import scipy.optimize  # noqa: F401  (loads scipy's own OpenBLAS first, so that the limit reaches it too)

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _lbfgs(theta0: np.ndarray, args: tuple) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    res = minimize(_objective, theta0, args=args, jac=True, method="L-BFGS-B",
                   options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-9})
    return res.x, float(res.fun)


@dataclass
class ParametricFit:
    theta: np.ndarray  # a, b, e, alpha, beta
    objective: float
    starts: int

    @property
    def law(self) -> ChinchillaLaw:
        a, b, e, alpha, beta = (float(v) for v in self.theta)
        return ChinchillaLaw("fitted", E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
                             source="maxlm plan fit (Huber on log-loss, Hoffmann et al. 2022 Approach 3)")


def _arrays(runs: list[RunPoint]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.log([r.n for r in runs]), np.log([r.d for r in runs]), np.log([r.loss for r in runs]))


def select_starts(grid: np.ndarray, values: np.ndarray, per_pair: int = STARTS_PER_EXPONENT_PAIR) -> np.ndarray:
    """The `per_pair` lowest-objective grid points of every (alpha, beta) pair."""
    keep = []
    pairs = grid[:, 3] * 100 + grid[:, 4]
    for p in np.unique(pairs):
        idx = np.flatnonzero(pairs == p)
        keep.extend(idx[np.argsort(values[idx])[:per_pair]])
    return grid[np.sort(np.array(keep))]


def fit_parametric(runs: list[RunPoint], delta: float = HUBER_DELTA, starts: str = "pairs") -> ParametricFit:
    """The best L-BFGS fit over the initialisation grid: `starts="pairs"` (default, see the module docstring) or
    `"all"` (every one of the 4,500 grid points, as Hoffmann et al.)."""
    if len(runs) < MIN_RUNS:
        raise ConfigError(f"fitting 5 coefficients needs at least {MIN_RUNS} runs, got {len(runs)}")
    if any(not (math.isfinite(r.loss) and r.loss > 0) for r in runs):
        raise ConfigError("every run's loss must be a positive finite number (read_inputs skips diverged runs)")
    if starts not in ("pairs", "all"):
        raise ConfigError(f"--starts must be 'pairs' or 'all', got {starts!r}")
    x, y, logl = _arrays(runs)
    w = np.ones_like(x)
    grid = _grid()
    if starts == "pairs":
        grid = select_starts(grid, _grid_values(grid, x, y, logl, w, delta))
    best: tuple[np.ndarray, float] | None = None
    with single_threaded_blas():
        for theta0 in grid:
            theta, val = _lbfgs(theta0, (x, y, logl, w, delta))
            if best is None or val < best[1]:
                best = (theta, val)
    assert best is not None
    if not (np.all(np.isfinite(best[0])) and math.isfinite(best[1])):
        raise ConfigError(f"the fit did not converge (coefficients {best[0].tolist()}); check the runs' losses")
    return ParametricFit(best[0], best[1], len(grid))


def bootstrap(runs: list[RunPoint], fit: ParametricFit, resamples: int, seed: int = 0,
              delta: float = HUBER_DELTA) -> np.ndarray:
    """Refits on `resamples` resamples-with-replacement of the runs, each from the full-data optimum; rows
    (a, b, e, alpha, beta)."""
    x, y, logl = _arrays(runs)
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, 5))
    with single_threaded_blas():
        for i in range(resamples):
            w = np.bincount(rng.integers(0, len(runs), len(runs)), minlength=len(runs)).astype(float)
            out[i] = _lbfgs(fit.theta, (x, y, logl, w, delta))[0]
    return out


def derived(theta: np.ndarray) -> dict[str, np.ndarray]:
    """Coefficients and the allocation they imply, vectorised over rows of theta (a, b, e, alpha, beta)."""
    theta = np.atleast_2d(theta)
    a, b, e, alpha, beta = theta.T
    s = alpha + beta
    with np.errstate(all="ignore"):
        g = (alpha * np.exp(a) / (beta * np.exp(b))) ** (1.0 / s)
    return {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta, "a": beta / s,
            "b": alpha / s, "G": g}


# ----------------------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP parabolas


@dataclass
class IsoFlopBudget:
    compute: float
    n_opt: float
    loss_opt: float
    coeffs: list[float]  # loss = c0 (log N)^2 + c1 log N + c2
    runs: list[RunPoint] = field(default_factory=list)


@dataclass
class IsoFlopFit:
    budgets: list[IsoFlopBudget]
    a: float | None  # N_opt ~ C^a over the budgets (None with fewer than 2)
    log_k: float | None  # log N_opt = a log C + log_k

    def n_opt(self, c: float) -> float | None:
        if self.a is None or self.log_k is None:
            return None
        return math.exp(self.a * math.log(c) + self.log_k)


def group_budgets(runs: list[RunPoint], tol: float = BUDGET_TOLERANCE) -> list[list[RunPoint]]:
    """Runs sorted by compute, split wherever consecutive budgets differ by more than `tol` (relative)."""
    groups: list[list[RunPoint]] = []
    for r in sorted(runs, key=lambda r: r.c):
        if groups and r.c <= groups[-1][0].c * (1 + tol):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def fit_isoflop(runs: list[RunPoint]) -> IsoFlopFit:
    """Per shared budget with >= 3 model sizes: a parabola of loss in log N (Hoffmann et al. Approach 2, Sec. 3.2);
    its vertex is that budget's N_opt. Then a power law N_opt ~ C^a through the vertices."""
    budgets = []
    for g in group_budgets(runs):
        ns = {r.n for r in g}
        if len(ns) < 3:
            continue
        x = np.log([r.n for r in g])
        c2, c1, c0 = np.polyfit(x, [r.loss for r in g], 2)
        if c2 <= 0:
            continue  # no minimum: the sweep did not bracket the optimum at this budget
        xv = -c1 / (2 * c2)
        if not x.min() - 1.0 <= xv <= x.max() + 1.0:
            continue  # vertex far outside the sampled sizes: an extrapolation, not a measurement
        c = float(np.exp(np.mean(np.log([r.c for r in g]))))
        budgets.append(IsoFlopBudget(c, float(np.exp(xv)), float(c0 + c1 * xv + c2 * xv * xv), [c2, c1, c0], g))
    a = log_k = None
    if len(budgets) >= 2:
        a, log_k = (float(v) for v in np.polyfit(np.log([b.compute for b in budgets]),
                                                 np.log([b.n_opt for b in budgets]), 1))
    return IsoFlopFit(budgets, a, log_k)


# ----------------------------------------------------------------------------------------------------------
# Everything `maxlm plan fit` reports


DEFAULT_RESAMPLES = 500


def fit_report(runs: list[RunPoint], resamples: int = DEFAULT_RESAMPLES, ci: float = 0.95, seed: int = 0,
               starts: str = "pairs") -> dict[str, Any]:
    """The fitted law (a `--law` JSON for the planner) with bootstrap intervals and the IsoFLOP analysis."""
    if not 0 < ci < 1:
        raise ConfigError(f"--ci must be in (0, 1), got {ci:g}")
    fit = fit_parametric(runs, starts=starts)
    boot_theta = bootstrap(runs, fit, resamples, seed) if resamples > 0 else None
    law = fit.law
    point = {k: float(v[0]) for k, v in derived(fit.theta).items()}
    intervals: dict[str, list[float]] = {}
    if boot_theta is not None:
        boot = derived(boot_theta)
        lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
        intervals = {k: [float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))] for k, v in boot.items()}
    iso = fit_isoflop(runs)
    out: dict[str, Any] = law.to_dict() | {
        "a": point["a"], "b": point["b"], "G": point["G"], "intervals": intervals, "ci": ci,
        "bootstrap_resamples": resamples, "huber_delta": HUBER_DELTA, "objective": fit.objective,
        "starts": fit.starts, "n_runs": len(runs),
        "isoflop": {"a": iso.a, "budgets": [{"compute": b.compute, "n_opt": b.n_opt, "loss_opt": b.loss_opt,
                                              "runs": len(b.runs)} for b in iso.budgets]},
        "interior_optimum": law.interior_problem() is None,
    }
    return out
