"""A concrete Llama-style decoder shape whose exact parameter count hits a target N.

The count is `maxlm.flops.count_params` (dense or MoE, from the ModelConfig's fields), the formula the model
tests hold equal to `jax.eval_shape`, so a planned shape has exactly the parameters the plan says. The proportions
follow published dense decoders:

- d_model a multiple of 128; head_dim 64 below d_model 2048, 128 from there (Llama 2/3 use 128 at >= 4096; the
  1-2B Llama 3.2 / TinyLlama use 64 at 2048; we switch at 2048 so that every >=2B plan has 128);
- ffn_dim = 8/3 d_model rounded to a multiple of 256 (SwiGLU keeps the 4d MLP's parameter count with 2/3 of the
  width, Shazeer 2020; 4096 -> 11008 exactly as Llama 2 7B);
- grouped-query attention with 8 KV heads once there are 16+ query heads (Llama 3 uses 8 at every size; 4 when 8
  does not divide the heads), else MHA;
- depth: the aspect ratio d_model / n_layers closest to that of published models of the same size, which rises
  from ~64 near 100M parameters (GPT-3 Small 768/12, Pythia-160M 768/12, Chinchilla's 44M 512/8) to ~128 around
  10B (Llama 2 7B and 13B: 4096/32, 5120/40) and ~160 at the largest (PaLM 540B 18432/118: 156;
  Llama 3 405B 16384/126: 130; Gopher 280B 16384/80: 205). Kaplan et al. 2020 (Fig. 5) found the loss within a
  few percent over aspect ratios from ~20 to ~200, so this is a soft preference, not a constraint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from maxlm.config import ConfigError, ModelConfig
from maxlm.flops import ParamCount, count_params

TOLERANCE = 0.05  # |params / N_opt - 1| allowed
MAX_D_MODEL = 65536
MAX_LAYERS = 256
# (parameters, d_model / n_layers) anchors of the preferred aspect ratio; log-linear in between, flat outside.
ASPECT_ANCHORS = ((1e8, 64.0), (1e10, 128.0), (1e12, 160.0))


@dataclass(frozen=True)
class MoESpec:
    """`--moe E,K`: every layer's MLP becomes E experts of the dense ffn width, K active per token."""

    num_experts: int
    experts_per_token: int


@dataclass(frozen=True)
class ShapeChoice:
    model: ModelConfig
    moe: MoESpec | None
    count: ParamCount
    law_params: int  # the count the law's N means (total or non-vocabulary; active for MoE)
    target: float

    @property
    def rel_error(self) -> float:
        return self.law_params / self.target - 1.0

    @property
    def aspect(self) -> float:
        return self.model.d_model / self.model.n_layers


def with_moe(m: ModelConfig, moe: MoESpec | None) -> ModelConfig:
    """The decoder with every layer's MLP replaced by E routed experts of the dense ffn width (moe_ffn_dim 0)."""
    if moe is None:
        return m
    return replace(m, ffn="moe", num_experts=moe.num_experts, experts_per_token=moe.experts_per_token,
                   moe_ffn_dim=0, first_dense_layers=0, moe_layer_interval=1, shared_experts=0)


def count_for(m: ModelConfig, moe: MoESpec | None) -> ParamCount:
    """maxlm's own count of the decoder (the one `maxlm.flops.count_params`; `m` already carries `moe`)."""
    return count_params(with_moe(m, moe))


def law_count(pc: ParamCount, counts: str) -> int:
    """The parameter count a law's N refers to: the active parameters (== total for dense models), minus the
    embedding and LM head for Kaplan-style laws that count non-vocabulary parameters only."""
    if counts == "non_vocab":
        return pc.active - pc.embedding - pc.lm_head
    return pc.active


def target_aspect(n: float) -> float:
    """Preferred d_model / n_layers at n parameters (log-linear between ASPECT_ANCHORS)."""
    pts = ASPECT_ANCHORS
    if n <= pts[0][0]:
        return pts[0][1]
    for (n0, a0), (n1, a1) in zip(pts, pts[1:]):
        if n <= n1:
            t = math.log(n / n0) / math.log(n1 / n0)
            return math.exp(math.log(a0) + t * math.log(a1 / a0))
    return pts[-1][1]


def ffn_for(d_model: int) -> int:
    return max(256, round(8 * d_model / 3 / 256) * 256)


def head_dim_for(d_model: int) -> int:
    return 128 if d_model >= 2048 else 64


def kv_heads_for(n_heads: int) -> int:
    if n_heads < 16:
        return n_heads
    return 8 if n_heads % 8 == 0 else 4 if n_heads % 4 == 0 else n_heads


def _heads_penalty(h: int) -> float:
    """Soft preference for head counts that tensor parallelism of 8 (then 4, then 2) divides."""
    if h < 8 or h % 8 == 0:
        return 0.0
    return 0.2 if h % 4 == 0 else 0.4 if h % 2 == 0 else 0.8


def search_shape(target: float, vocab_size: int, *, counts: str = "total", moe: MoESpec | None = None,
                 head_dim: int = 0, kv_heads: int = 0, tie_embeddings: bool = False) -> ShapeChoice:
    """The best-proportioned shape whose law-relevant count is within TOLERANCE of `target`.

    For each d_model the count is affine in n_layers, so the two depths around the target are the only candidates:
    ~512 widths x 2 depths exact counts, a few milliseconds. Among those within tolerance, the one whose aspect
    ratio is closest (in log) to `target_aspect` wins, with small tie-breakers for count accuracy and for head
    counts that tensor parallelism divides (`_heads_penalty`).
    """
    if target <= 0:
        raise ConfigError(f"cannot size a model for {target:g} parameters")
    want_aspect = target_aspect(target)
    best: tuple[float, ShapeChoice] | None = None
    smallest: ShapeChoice | None = None
    for d in range(128, MAX_D_MODEL + 1, 128):
        hd = head_dim or head_dim_for(d)
        if d % hd:
            continue
        h = d // hd
        k = kv_heads or kv_heads_for(h)
        if k > h or h % k:
            continue
        base = with_moe(ModelConfig(vocab_size=vocab_size, d_model=d, n_layers=1, n_heads=h, n_kv_heads=k,
                                    head_dim=hd, ffn_dim=ffn_for(d), tie_embeddings=tie_embeddings), moe)
        one = law_count(count_for(base, moe), counts)
        two = law_count(count_for(replace(base, n_layers=2), moe), counts)
        per_layer, fixed = two - one, 2 * one - two
        if smallest is None:
            m1 = base
            smallest = ShapeChoice(m1, moe, count_for(m1, moe), one, target)
        if fixed + per_layer > 2 * target:
            break  # even one layer is far too big at this width, and wider only grows
        if fixed + per_layer > target * (1 + TOLERANCE):
            continue
        est = (target - fixed) / per_layer
        for n_layers in {max(1, math.floor(est)), max(1, math.ceil(est))}:
            if n_layers > MAX_LAYERS:
                continue
            m = replace(base, n_layers=n_layers)
            pc = count_for(m, moe)
            lc = law_count(pc, counts)
            err = abs(lc / target - 1.0)
            if err > TOLERANCE:
                continue
            cost = abs(math.log(d / n_layers / want_aspect)) + 2.0 * err + _heads_penalty(h)
            if best is None or cost < best[0]:
                best = (cost, ShapeChoice(m, moe, pc, lc, target))
    if best is None:
        if smallest is not None and smallest.law_params > target:
            raise ConfigError(
                f"a budget this small calls for ~{target:.3g} parameters, but the smallest decoder (1 layer, d_model "
                f"128, vocab {vocab_size}) has {smallest.law_params:,}; raise the budget or lower --vocab")
        raise ConfigError(f"no decoder shape within {TOLERANCE:.0%} of {target:.4g} parameters (d_model <= "
                          f"{MAX_D_MODEL}, <= {MAX_LAYERS} layers)")
    return best[1]
