"""Parametric loss laws L(N, D) and their compute-optimal allocation under C = 6 N D.

Two functional forms:

- Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", arXiv:2203.15556), Sec. 3.3:
  L(N, D) = E + A / N^alpha + B / D^beta, with N counting all parameters (embeddings included).
- Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", arXiv:2001.08361), Eq. (1.5):
  L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D, with N counting non-embedding parameters.

Every law is minimised along the IsoFLOP line D = C / (6 N) twice: in closed form and numerically (a bracketed
golden-section search on log N), so a hand-written or fitted law is checked the same way as the built-in ones and
a law without an interior optimum is reported instead of silently planning at the edge of the search range.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

from maxlm.config import ConfigError


@dataclass(frozen=True)
class ChinchillaLaw:
    """L = E + A N^-alpha + B D^-beta (Hoffmann et al. 2022, Sec. 3.3); N counts every parameter."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""
    params: str = "total"  # which parameter count N means: "total" (embeddings included) or "non_vocab"
    form: str = "chinchilla"

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta

    def reducible(self, n: float, d: float) -> float:
        """The part of the loss that N and D control (loss minus E): same argmin, better conditioned."""
        return self.A * n ** -self.alpha + self.B * d ** -self.beta

    def interior_problem(self) -> str | None:
        """Why L(N, C/6N) has no finite minimiser, or None when it has one (A, B, alpha, beta all > 0)."""
        if self.A <= 0 or self.alpha <= 0:
            return (f"A={self.A:g}, alpha={self.alpha:g}: the loss never falls with more parameters, so every FLOP "
                    f"should go to tokens (N -> 0)")
        if self.B <= 0 or self.beta <= 0:
            return (f"B={self.B:g}, beta={self.beta:g}: the loss never falls with more tokens, so every FLOP should "
                    f"go to parameters (D -> 0)")
        return None

    def closed_form(self, c: float) -> tuple[float, float]:
        """Hoffmann et al. 2022, Sec. 3.3: N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b with
        G = (alpha A / (beta B))^(1/(alpha+beta)), a = beta / (alpha + beta), b = alpha / (alpha + beta)."""
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        return g * (c / 6.0) ** (self.beta / s), (c / 6.0) ** (self.alpha / s) / g

    def exponent(self) -> float:
        """a in N_opt ~ C^a."""
        return self.beta / (self.alpha + self.beta)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KaplanLaw:
    """L = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D (Kaplan et al. 2020, Eq. 1.5); N excludes embeddings."""

    name: str
    Nc: float
    Dc: float
    alpha_N: float
    alpha_D: float
    source: str = ""
    params: str = "non_vocab"
    form: str = "kaplan"

    def _inner(self, n: float, d: float) -> float:
        return (self.Nc / n) ** (self.alpha_N / self.alpha_D) + self.Dc / d

    def loss(self, n: float, d: float) -> float:
        return self._inner(n, d) ** self.alpha_D

    def reducible(self, n: float, d: float) -> float:
        """A monotone transform of the loss (the bracket of Eq. 1.5): same argmin over N."""
        return self._inner(n, d)

    def interior_problem(self) -> str | None:
        if self.Nc <= 0 or self.Dc <= 0 or self.alpha_N <= 0 or self.alpha_D <= 0:
            return "Kaplan-form laws need N_c, D_c, alpha_N, alpha_D > 0 for the loss to fall with N and D"
        return None

    def closed_form(self, c: float) -> tuple[float, float]:
        """Minimise f(N) = N_c^p N^-p + 6 D_c N / C (p = alpha_N/alpha_D): f'(N) = 0 gives
        N^(1+p) = p N_c^p C / (6 D_c); the loss is f^alpha_D, increasing in f, so the argmin is the same."""
        p = self.alpha_N / self.alpha_D
        n = (p * self.Nc ** p * c / (6.0 * self.Dc)) ** (1.0 / (1.0 + p))
        return n, c / (6.0 * n)

    def exponent(self) -> float:
        return self.alpha_D / (self.alpha_N + self.alpha_D)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Law = ChinchillaLaw | KaplanLaw

EPOCH_SOURCE = ("Besiroglu et al. 2024, arXiv:2404.10102: Epoch AI's refit of Hoffmann et al.'s Approach 3 "
                "to the data of their Figure 4")

BUILTIN_LAWS: dict[str, Law] = {
    # Default. Its optimum at Chinchilla's own budget is ~20 tokens/param, matching the 70B/1.4T model that
    # Hoffmann et al. trained; see the README's Planner section for why the printed coefficients are not the default.
    "epoch": ChinchillaLaw("epoch", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, source=EPOCH_SOURCE),
    "chinchilla": ChinchillaLaw(
        "chinchilla", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
        source="Hoffmann et al. 2022, arXiv:2203.15556, Approach 3 as printed (App. D.2)"),
    "chinchilla-unrounded": ChinchillaLaw(
        "chinchilla-unrounded", E=math.exp(0.5267228), A=math.exp(6.0073404), B=math.exp(6.0179186),
        alpha=0.33917084, beta=0.2849083,
        source="Hoffmann et al. 2022, Approach 3 before rounding (their arXiv TeX source, via Besiroglu et al. "
               "2024)"),
    "kaplan": KaplanLaw(
        "kaplan", Nc=6.4e13, Dc=1.8e13, alpha_N=0.076, alpha_D=0.103,
        source="Kaplan et al. 2020, arXiv:2001.08361, Eq. (1.5) with Table 2's L(N, D) fit; N excludes embeddings"),
}
DEFAULT_LAW = "epoch"


def load_law(spec: str) -> Law:
    """A built-in law name, or a JSON file holding one (what `maxlm plan fit --out` writes)."""
    if spec in BUILTIN_LAWS:
        return BUILTIN_LAWS[spec]
    if not os.path.isfile(spec):
        raise ConfigError(f"--law {spec!r} is neither a built-in law ({', '.join(BUILTIN_LAWS)}) nor a JSON file")
    try:
        with open(spec) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--law {spec}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--law {spec}: expected a JSON object with the law's coefficients")
    return law_from_dict(data, default_name=os.path.splitext(os.path.basename(spec))[0], where=spec)


def law_from_dict(data: dict[str, Any], default_name: str = "custom", where: str = "law") -> Law:
    form = data.get("form", "chinchilla")
    keys = {"chinchilla": ("E", "A", "B", "alpha", "beta"), "kaplan": ("Nc", "Dc", "alpha_N", "alpha_D")}
    if form not in keys:
        raise ConfigError(f"{where}: form {form!r} is not one of {', '.join(keys)}")
    missing = [k for k in keys[form] if k not in data]
    if missing:
        raise ConfigError(f"{where}: a {form} law needs {', '.join(keys[form])}; missing {', '.join(missing)}")
    vals: dict[str, float] = {}
    for k in keys[form]:
        v = data[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{where}: {k} must be a finite number, got {v!r}")
        vals[k] = float(v)
    params = data.get("params", "total" if form == "chinchilla" else "non_vocab")
    if params not in ("total", "non_vocab"):
        raise ConfigError(f"{where}: params must be 'total' or 'non_vocab', got {params!r}")
    name = str(data.get("name", default_name))
    source = str(data.get("source", where))
    if form == "chinchilla":
        return ChinchillaLaw(name=name, source=source, params=params, **vals)
    return KaplanLaw(name=name, source=source, params=params, **vals)


# ----------------------------------------------------------------------------------------------------------
# The optimum along C = 6 N D


@dataclass(frozen=True)
class Optimum:
    """Compute-optimal (N, D) for one budget; `n_numeric` is the independent numeric check of the closed form."""

    compute: float
    n: float
    d: float
    loss: float
    n_numeric: float
    d_numeric: float

    @property
    def tokens_per_param(self) -> float:
        return self.d / self.n


_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def _golden(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-12) -> float:
    """Golden-section minimum of a unimodal f on [lo, hi] (no scipy import: a plan must stay fast)."""
    a, b = lo, hi
    x1, x2 = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    f1, f2 = f(x1), f(x2)
    while b - a > tol * max(1.0, abs(a) + abs(b)):
        if f1 < f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - _INV_PHI * (b - a)
            f1 = f(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + _INV_PHI * (b - a)
            f2 = f(x2)
    return (a + b) / 2.0


def numeric_optimum(law: Law, compute: float, grid: int = 400) -> tuple[float, float]:
    """argmin over N of L(N, C/6N), found without the closed form.

    A log-spaced scan over 1 <= N <= C/6 (i.e. D >= 1 token) brackets the minimum, golden section refines it on
    log N. A minimum on the edge of that range means the law has no interior optimum: raised as a ConfigError.
    """
    if compute <= 6.0:
        raise ConfigError(f"compute budget {compute:g} FLOPs is too small to train anything")
    hi = math.log(compute / 6.0)

    def f(x: float) -> float:
        n = math.exp(x)
        r = law.reducible(n, compute / (6.0 * n))
        return math.log(r) if r > 0 else -math.inf

    xs = [hi * i / grid for i in range(grid + 1)]
    vals = [f(x) for x in xs]
    k = min(range(len(xs)), key=vals.__getitem__)
    if k == 0 or k == grid:
        edge = "N -> 1 parameter" if k == 0 else "D -> 1 token"
        raise ConfigError(f"law {law.name!r} has no interior optimum at C={compute:.3g}: the loss keeps falling "
                          f"towards {edge}; check its coefficients (or fit it on runs that bracket the optimum)")
    x = _golden(f, xs[k - 1], xs[k + 1])
    n = math.exp(x)
    return n, compute / (6.0 * n)


def optimum(law: Law, compute: float) -> Optimum:
    """Closed-form optimum, cross-checked numerically; ConfigError when the law has no interior optimum."""
    problem = law.interior_problem()
    if problem:
        raise ConfigError(f"law {law.name!r} has no interior optimum: {problem}")
    n, d = law.closed_form(compute)
    n_num, d_num = numeric_optimum(law, compute)
    return Optimum(compute=compute, n=n, d=d, loss=law.loss(n, d), n_numeric=n_num, d_numeric=d_num)


def fixed_ratio(law: Law, compute: float, tokens_per_param: float) -> Optimum:
    """`--tokens-per-param R` overrides the law's allocation: D = R N and C = 6 N D give N = sqrt(C / 6R)."""
    if tokens_per_param <= 0:
        raise ConfigError(f"--tokens-per-param must be positive, got {tokens_per_param:g}")
    n = math.sqrt(compute / (6.0 * tokens_per_param))
    d = tokens_per_param * n
    return Optimum(compute=compute, n=n, d=d, loss=law.loss(n, d), n_numeric=n, d_numeric=d)
