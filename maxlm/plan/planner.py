"""Budget -> Plan: the compute-optimal allocation, a concrete shape, batch/lr/steps, time and memory, and a Config.

Two compute conventions meet here, and the plan reports both:

- the law's C is 6 N D (how Hoffmann et al. and Kaplan et al. state their allocations): `--compute` is in these
  units, and the sweep/fit loop uses them too, so budgets, fits and plans agree;
- the hardware executes maxlm's counted FLOPs (`maxlm.flops.flops_per_token` x tokens: 6 x matmul parameters plus
  the attention scores, the same number MFU is computed from), which exceeds 6ND by the attention term and
  differs by the embedding. Wall-clock is computed from counted FLOPs. For `--days`, the law budget is solved so
  that the *counted* FLOPs of the resulting plan fill the given days at the given MFU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from maxlm.config import Config, ConfigError, DataConfig, MeshConfig, OptimConfig, TrainConfig
from maxlm.flops import HARDWARE, Hardware, flops_per_token
from maxlm.plan import hparams
from maxlm.plan.laws import DEFAULT_LAW, Law, Optimum, fixed_ratio, load_law, optimum
from maxlm.plan.memory import REMAT_BY_RECOMPUTE, MeshChoice, choose_mesh
from maxlm.plan.shape import MoESpec, ShapeChoice, search_shape

DEFAULT_SEQ_LEN = 4096
DEFAULT_VOCAB = 32000
DEFAULT_MFU = 0.4
DEFAULT_BATCH_MULTIPLE = 8  # rows are rounded to this when the chip count is unknown
SECONDS_PER_DAY = 86400.0


@dataclass
class PlanRequest:
    """Everything a user can ask of the planner (the CLI flags, one to one)."""

    compute: float | None = None  # law FLOPs, 6ND
    hardware: str | None = None
    chips: int | None = None
    days: float | None = None
    mfu: float = DEFAULT_MFU
    law: str = DEFAULT_LAW
    vocab: int = DEFAULT_VOCAB
    seq_len: int = DEFAULT_SEQ_LEN
    tokens_per_param: float | None = None
    moe: tuple[int, int] | None = None
    remat: str = "full"
    head_dim: int = 0
    kv_heads: int = 0


@dataclass
class Plan:
    """A complete plan; `to_dict` is the `--json` output."""

    request: PlanRequest
    law: Law
    hardware: Hardware | None
    compute: float  # law FLOPs (6 N D) the allocation is computed for
    optimum: Optimum
    shape: ShapeChoice
    tokens: int  # tokens actually trained: steps x rows x seq_len
    rows: int
    steps: int
    warmup_steps: int
    lr: float
    batch_tokens_opt: float  # DeepSeek B_opt before rounding to rows
    deepseek_compute: float  # DeepSeek's C = M x D
    flops_per_token: float  # counted, maxlm.flops
    mesh: MeshChoice | None
    notes: list[str] = field(default_factory=list)

    @property
    def chips(self) -> int:
        return self.request.chips or 1

    @property
    def batch_tokens(self) -> int:
        return self.rows * self.request.seq_len

    @property
    def training_flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def predicted_loss(self) -> float:
        return self.law.loss(self.shape.law_params, self.tokens)

    @property
    def seconds(self) -> float | None:
        if self.hardware is None:
            return None
        return self.training_flops / (self.chips * self.hardware.peak_flops * self.request.mfu)

    def to_dict(self) -> dict[str, Any]:
        m = self.shape.model
        out: dict[str, Any] = {
            "request": asdict(self.request),
            "law": self.law.to_dict() | {"exponent_a": self.law.exponent()},
            "compute_6nd": self.compute,
            "optimum": {"n": self.optimum.n, "d": self.optimum.d, "tokens_per_param": self.optimum.tokens_per_param,
                        "loss": self.optimum.loss, "n_numeric": self.optimum.n_numeric,
                        "d_numeric": self.optimum.d_numeric},
            "model": {"n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads,
                      "head_dim": m.head_dim, "ffn_dim": m.ffn_dim, "vocab_size": m.vocab_size,
                      "tie_embeddings": m.tie_embeddings,
                      "num_experts": self.shape.moe.num_experts if self.shape.moe else 0,
                      "experts_per_token": self.shape.moe.experts_per_token if self.shape.moe else 0},
            "params": {"total": self.shape.count.total, "active": self.shape.count.active,
                       "law": self.shape.law_params, "rel_error_vs_n_opt": self.shape.rel_error},
            "training": {"tokens": self.tokens, "tokens_per_param": self.tokens / self.shape.law_params,
                         "seq_len": self.request.seq_len, "global_batch_rows": self.rows,
                         "batch_tokens": self.batch_tokens, "batch_tokens_opt": self.batch_tokens_opt,
                         "steps": self.steps, "warmup_steps": self.warmup_steps, "lr": self.lr, "schedule": "cosine",
                         "deepseek_compute": self.deepseek_compute, "predicted_loss": self.predicted_loss},
            "flops": {"per_token": self.flops_per_token, "per_token_6n": 6.0 * self.shape.count.active,
                      "training": self.training_flops},
            "hardware": None, "memory": None, "notes": self.notes,
        }
        if self.hardware:
            out["hardware"] = {"name": self.hardware.name, "chips": self.chips, "peak_flops": self.hardware.peak_flops,
                               "hbm_bytes": self.hardware.hbm_bytes, "mfu": self.request.mfu,
                               "seconds": self.seconds, "days": self.seconds / SECONDS_PER_DAY}
        if self.mesh:
            out["memory"] = self.mesh.estimate.to_dict() | {"fits": self.mesh.fits, "hbm_bytes": self.mesh.hbm_bytes,
                                                            "usable_bytes": self.mesh.usable_bytes}
        return out


def resolve_hardware(name: str) -> Hardware:
    """A `maxlm.flops.HARDWARE` key; `v5p`, `TPU-v5p` and `tpu v5p` all name `tpu-v5p`."""
    key = name.strip().lower().replace(" ", "-").replace("_", "-")
    for cand in (key, f"tpu-{key}"):
        if cand in HARDWARE:
            return HARDWARE[cand]
    raise ConfigError(f"--hardware {name!r} is not one of {', '.join(HARDWARE)}")


def _check_request(req: PlanRequest) -> Hardware | None:
    if (req.compute is None) == (req.days is None):
        raise ConfigError("give the budget one way: --compute FLOPS, or --hardware NAME --chips K --days T [--mfu U]")
    hw = resolve_hardware(req.hardware) if req.hardware else None
    if req.days is not None:
        if hw is None or req.chips is None:
            raise ConfigError("--days needs --hardware NAME and --chips K (and optionally --mfu, default 0.4)")
        if req.days <= 0:
            raise ConfigError(f"--days must be positive, got {req.days:g}")
    if req.compute is not None and not (req.compute > 0 and math.isfinite(req.compute)):
        raise ConfigError(f"--compute must be a positive number of FLOPs, got {req.compute:g}")
    if req.chips is not None and req.chips < 1:
        raise ConfigError(f"--chips must be >= 1, got {req.chips}")
    if not 0 < req.mfu <= 1:
        raise ConfigError(f"--mfu is a fraction of peak in (0, 1], got {req.mfu:g}")
    if req.vocab < 1 or req.seq_len < 1:
        raise ConfigError("--vocab and --seq-len must be positive")
    if req.moe is not None:
        e, k = req.moe
        if e < 2 or not 1 <= k <= e:
            raise ConfigError(f"--moe E,K needs E >= 2 experts and 1 <= K <= E active per token, got {e},{k}")
    if req.remat not in REMAT_BY_RECOMPUTE + ("auto",):
        raise ConfigError(f"--remat {req.remat!r} is not one of {', '.join(REMAT_BY_RECOMPUTE + ('auto',))}")
    hd = req.head_dim
    if hd and not (hd > 0 and hd % 2 == 0 and (128 % hd == 0 or hd % 128 == 0)):
        raise ConfigError(f"--head-dim {req.head_dim} must be even and divide or be a multiple of 128 (64 or 128)")
    return hw


@dataclass(frozen=True)
class _Allocation:
    opt: Optimum
    shape: ShapeChoice
    tokens: float  # C / (6 N_shape): the budget spent on the shape actually built
    fpt: float


def _allocate(req: PlanRequest, law: Law, compute: float) -> _Allocation:
    opt = fixed_ratio(law, compute, req.tokens_per_param) if req.tokens_per_param else optimum(law, compute)
    moe = MoESpec(*req.moe) if req.moe else None
    shape = search_shape(opt.n, req.vocab, counts=law.params, moe=moe, head_dim=req.head_dim, kv_heads=req.kv_heads)
    fpt = flops_per_token(shape.model, req.seq_len)  # the model carries its MoE fields: active params count
    return _Allocation(opt, shape, compute / (6.0 * shape.law_params), fpt)


def make_plan(req: PlanRequest) -> Plan:
    """The whole plan for one request (ConfigError on bad input or a law without an interior optimum)."""
    hw = _check_request(req)
    law = load_law(req.law)
    notes: list[str] = []
    if req.compute is not None:
        compute = req.compute
        alloc = _allocate(req, law, compute)
    else:
        assert hw is not None and req.chips is not None and req.days is not None
        hw_flops = req.chips * hw.peak_flops * req.mfu * req.days * SECONDS_PER_DAY
        compute = hw_flops
        for _ in range(30):  # counted FLOPs(shape(C)) x D(C) = hardware FLOPs, solved by fixed-point iteration
            alloc = _allocate(req, law, compute)
            counted = alloc.fpt * alloc.tokens
            if abs(counted / hw_flops - 1.0) < 1e-6:
                break
            compute *= hw_flops / counted
        notes.append(f"{req.days:g} days x {req.chips} {hw.name} x {hw.peak_flops / 1e12:g} TFLOP/s x MFU {req.mfu:g} "
                     f"= {hw_flops:.3g} counted FLOPs = {compute:.3g} in the law's 6ND units")
    shape = alloc.shape
    m = shape.model
    c_m = hparams.non_embedding_flops_per_token(m, req.seq_len) * alloc.tokens
    b_opt = hparams.deepseek_batch_tokens(c_m)
    rows = hparams.batch_rows(b_opt, req.seq_len, req.chips or DEFAULT_BATCH_MULTIPLE)
    steps = max(1, round(alloc.tokens / (rows * req.seq_len)))
    tokens = steps * rows * req.seq_len
    if steps < 100:
        notes.append(f"only {steps} steps: the budget is small for a {rows}-row batch of {req.seq_len} tokens")
    mesh = None
    if hw is not None:
        mesh = choose_mesh(m, shape.moe, shape.count, req.seq_len, global_rows=rows, chips=req.chips or 1,
                           hbm_bytes=hw.hbm_bytes, remat=req.remat, flash=not hw.name.startswith("tpu"),
                           platform="tpu" if hw.name.startswith("tpu") else "cuda")
        if not mesh.fits:
            e = mesh.estimate
            axes = f"expert x fsdp x tensor = {e.expert * e.fsdp * e.tensor}" if shape.moe else \
                f"fsdp x tensor = {e.fsdp * e.tensor}"
            notes.append(f"WARNING: nothing fits in {hw.hbm_bytes / 1e9:g} GB per chip, even at {axes} with remat "
                         f"{e.remat} and {e.grad_accum} microbatches: use more chips or a smaller --seq-len")
    return Plan(request=req, law=law, hardware=hw, compute=compute, optimum=alloc.opt, shape=shape, tokens=tokens,
                rows=rows, steps=steps, warmup_steps=hparams.warmup_steps(steps), lr=hparams.deepseek_lr(c_m),
                batch_tokens_opt=b_opt, deepseek_compute=c_m, flops_per_token=alloc.fpt, mesh=mesh, notes=notes)


def plan_to_config(plan: Plan, run_dir: str, data_path: str = "", tokenizer: str = "") -> Config:
    """A complete maxlm Config for the plan: synthetic data unless a path is given.

    The mesh is the planned one, every axis explicit (data x fsdp x tensor x expert = chips), so the config
    validates on exactly `--chips` devices. An MoE plan keeps the model's MoE fields as planned (`--moe E,K`: every
    layer routed, experts of the dense ffn width, dropless, no shared experts) and puts its experts on
    `mesh.expert`, the size the memory model chose; `validate` then checks num_experts % expert == 0 and that the
    default rules split the batch over expert too. Without `--hardware` there is no mesh choice: maxlm's default
    (fsdp over all devices, expert 1) is written.
    """
    m = plan.shape.model
    remat = plan.mesh.estimate.remat if plan.mesh else ("full" if plan.request.remat == "auto" else plan.request.remat)
    model = replace(m, remat=remat)
    if data_path:
        if not tokenizer:
            raise ConfigError("--data needs --tokenizer PATH (a sentencepiece model from `maxlm tokenizer train`)")
        source = "jsonl" if data_path.rstrip("*").endswith((".jsonl", ".json")) else "text"
        data = DataConfig(source=source, path=data_path, tokenizer=tokenizer, seq_len=plan.request.seq_len)
    else:
        data = DataConfig(source="synthetic", seq_len=plan.request.seq_len)
    if plan.mesh:
        e = plan.mesh.estimate
        mesh = MeshConfig(data=e.data, fsdp=e.fsdp, tensor=e.tensor, expert=e.expert)
        grad_accum = e.grad_accum
    else:
        mesh, grad_accum = MeshConfig(), 1
    optim = OptimConfig(lr=float(f"{plan.lr:.4g}"), schedule="cosine", warmup_steps=plan.warmup_steps)
    train = TrainConfig(steps=plan.steps, global_batch_size=plan.rows, grad_accum=grad_accum,
                        hardware=plan.hardware.name if plan.hardware else "auto",
                        log_every=max(1, min(100, plan.steps // 100 or 1)))
    return Config(run_dir=run_dir, model=model, mesh=mesh, data=data, optim=optim, train=train)
