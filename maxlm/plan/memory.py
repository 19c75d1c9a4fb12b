"""Peak memory per chip for a training step, and the smallest fsdp x tensor mesh that fits it.

What is counted (bytes per chip; maxlm's defaults: f32 parameters, AdamW, bf16 compute):

- parameters, gradients and the two Adam moments in f32 (4 + 4 + 8 bytes per parameter), sharded over
  fsdp x tensor: maxlm's rules put every weight's `embed` dimension on fsdp and its heads/mlp/vocab dimension on
  tensor (ZeRO-3-style, Rajbhandari et al. 2020), replicated over `data`;
- a layer workspace: the bf16 copy of one layer's weights (two when fsdp > 1: the all-gathered current layer and
  the prefetched next one) plus that layer's f32 weight gradients before they are reduce-scattered;
- activations saved for the backward pass, itemised per token per layer for maxlm's block (RMSNorm, GQA attention,
  SwiGLU) in the way of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
  Sec. 4), under the remat policy (`model.remat`, jax.checkpoint_policies):
    none          every tensor the backward needs: layer input, both norm outputs, q, k, v, attention output,
                  the residual, gate, up, silu(gate) * up (+ the softmax probabilities when attention is XLA's);
    dots          only matmul outputs (checkpoint_dots): q/k/v projections, o and down projections, gate, up,
                  and with XLA attention its QK^T logits and AV output; the rest is recomputed;
    dots_no_batch only weight-matmul outputs (checkpoint_dots_with_no_batch_dims): attention dots are recomputed;
    full          only each layer's input (the scan carry); the whole layer is recomputed;
  plus one layer's full set while it is being recomputed/differentiated. Tensors with a heads/mlp dimension are
  split over `tensor`; d_model-wide ones are replicated over it (maxlm has no sequence parallelism);
- the logits: bf16 logits, their f32 log-softmax and its gradient (vocab split over tensor), and the boolean
  document mask [rows, 1, T, T].

With cuDNN flash attention (maxlm's `auto` on GPU) the T x T score matrix is never stored; with XLA attention
(CPU/TPU) it is. XLA's own temporaries, fragmentation and the runtime are covered by using only
`USABLE_HBM_FRACTION` of HBM: this is an estimate to pick a mesh, not a guarantee.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from maxlm.config import ModelConfig
from maxlm.flops import ParamCount
from maxlm.plan.shape import MoESpec

PARAM_BYTES = 4  # model.param_dtype float32
ACT_BYTES = 2  # bf16 compute dtype off CPU
STATE_BYTES_PER_PARAM = 4 + 4 + 8  # params, grads, Adam mu and nu (f32)
USABLE_HBM_FRACTION = 0.9
MAX_TENSOR = 8  # tensor parallelism stays inside one NVLink / ICI-local group
REMAT_POLICIES = ("none", "dots", "dots_no_batch", "full")  # least recompute first


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per chip of one training step on one mesh."""

    remat: str
    data: int
    fsdp: int
    tensor: int
    grad_accum: int
    micro_rows: int  # rows per data-parallel rank per microbatch
    params: float
    grads: float
    optimizer: float
    workspace: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.workspace + self.activations + self.logits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"total": self.total}


@dataclass(frozen=True)
class MeshChoice:
    """The chosen mesh and its estimate; `fits` False means even the most frugal option exceeds HBM."""

    estimate: MemoryEstimate
    fits: bool
    hbm_bytes: float

    @property
    def usable_bytes(self) -> float:
        return USABLE_HBM_FRACTION * self.hbm_bytes


def activation_bytes_per_token(m: ModelConfig, moe: MoESpec | None, seq_len: int, tensor: int, remat: str,
                               flash: bool) -> tuple[float, float]:
    """(saved per layer, working set of the one layer in flight), bytes per token on one chip."""
    d, t, T = m.d_model, tensor, seq_len
    hd = m.head_dim or d // m.n_heads
    q, kv = m.n_heads * hd, 2 * m.n_kv_heads * hd
    k_active = moe.experts_per_token if moe else 1
    f = m.ffn_dim * k_active  # SwiGLU intermediates of every expert a token visits
    router = 4.0 * moe.num_experts if moe else 0.0  # f32 router logits
    scores = 0.0 if flash else ACT_BYTES * m.n_heads * T / t  # softmax probabilities kept by XLA attention
    # none: x, norm1(x), q, k, v, attention out, x + attn, norm2(.), gate, up, silu(gate) * up
    none = ACT_BYTES * (4 * d + (2 * q + kv + 3 * f) / t) + scores + router + 4.0 * m.n_heads / t
    if remat == "none":
        saved = none
    elif remat == "dots":
        attn_dots = 0.0 if flash else ACT_BYTES * (m.n_heads * T + q) / t  # QK^T logits and AV output
        saved = ACT_BYTES * (3 * d + (q + kv + 2 * f) / t) + attn_dots + router
    elif remat == "dots_no_batch":
        saved = ACT_BYTES * (3 * d + (q + kv + 2 * f) / t) + router
    elif remat == "full":
        saved = ACT_BYTES * d
    else:
        raise ValueError(f"unknown remat policy {remat!r}")
    working = none + (0.0 if flash else 4.0 * m.n_heads * T / t)  # + the f32 softmax being differentiated
    return saved, working


def estimate_memory(m: ModelConfig, moe: MoESpec | None, count: ParamCount, seq_len: int, *, micro_rows: int,
                    data: int, fsdp: int, tensor: int, grad_accum: int, remat: str, flash: bool) -> MemoryEstimate:
    shard = fsdp * tensor
    saved, working = activation_bytes_per_token(m, moe, seq_len, tensor, remat, flash)
    tokens = micro_rows * seq_len
    layer_copies = 2 if fsdp > 1 else 1
    workspace = count.per_layer * (layer_copies * ACT_BYTES + PARAM_BYTES) / tensor
    if fsdp > 1:
        workspace += (count.embedding + count.lm_head) * ACT_BYTES / tensor  # gathered embedding / head
    logits = tokens * m.vocab_size * (ACT_BYTES + 4 + 4) / tensor + micro_rows * seq_len * seq_len
    return MemoryEstimate(
        remat=remat, data=data, fsdp=fsdp, tensor=tensor, grad_accum=grad_accum, micro_rows=micro_rows,
        params=count.total * PARAM_BYTES / shard, grads=count.total * PARAM_BYTES / shard,
        optimizer=count.total * 8 / shard, workspace=workspace,
        activations=tokens * (m.n_layers * saved + working), logits=logits)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def mesh_candidates(m: ModelConfig, chips: int) -> list[tuple[int, int]]:
    """(fsdp, tensor) pairs that maxlm's `validate` accepts for this shape, least sharded first; among equal
    sharding, fsdp before tensor (fsdp's all-gathers overlap with compute; tensor needs the fastest links)."""
    out = []
    for t in _divisors(chips):
        if t > MAX_TENSOR or m.n_heads % t or m.n_kv_heads % t or m.ffn_dim % t or m.vocab_size % t:
            continue
        for f in _divisors(chips // t):
            if m.d_model % f == 0:
                out.append((f, t))
    return sorted(out, key=lambda ft: (ft[0] * ft[1], ft[1]))


def choose_mesh(m: ModelConfig, moe: MoESpec | None, count: ParamCount, seq_len: int, *, global_rows: int,
                chips: int, hbm_bytes: float, remat: str = "full", flash: bool = True) -> MeshChoice:
    """The smallest fsdp x tensor mesh (the rest of the chips go to `data`) whose step fits in HBM.

    Order of preference: no gradient accumulation before accumulation; with `remat="auto"`, the policy with the
    least recomputation that fits (none, dots, dots_no_batch, full) and the smallest mesh for it; then the fixed
    or most frugal policy with more microbatches (any divisor of the rows per data-parallel rank). When nothing
    fits, the most frugal option is returned with `fits=False` so the plan can show how far off it is.
    """
    usable = USABLE_HBM_FRACTION * hbm_bytes
    meshes = mesh_candidates(m, chips)
    if not meshes:
        meshes = [(1, 1)]
    policies = REMAT_POLICIES if remat == "auto" else (remat,)
    last = "full" if remat == "auto" else remat

    def est(f: int, t: int, policy: str, accum: int) -> MemoryEstimate | None:
        dp = chips // t
        if global_rows % (dp * accum):
            return None
        return estimate_memory(m, moe, count, seq_len, micro_rows=global_rows // (dp * accum), data=dp // f, fsdp=f,
                               tensor=t, grad_accum=accum, remat=policy, flash=flash)

    frugal: MemoryEstimate | None = None

    def consider(e: MemoryEstimate | None) -> bool:
        nonlocal frugal
        if e is None:
            return False
        if frugal is None or e.total < frugal.total:
            frugal = e
        return e.total <= usable

    for policy in policies:
        for f, t in meshes:
            e = est(f, t, policy, 1)
            if consider(e):
                return MeshChoice(e, True, hbm_bytes)
    accums = sorted({a for t in {t for _, t in meshes} for a in _divisors(global_rows // (chips // t)) if a > 1})
    for accum in accums:
        for f, t in meshes:
            e = est(f, t, last, accum)
            if consider(e):
                return MeshChoice(e, True, hbm_bytes)
    if frugal is None:  # no mesh divides the batch: report the most sharded one with one row per rank
        f, t = max(meshes, key=lambda ft: ft[0] * ft[1])
        frugal = estimate_memory(m, moe, count, seq_len, micro_rows=1, data=chips // (f * t), fsdp=f, tensor=t,
                                 grad_accum=1, remat=last, flash=flash)
    return MeshChoice(frugal, False, hbm_bytes)
