"""Peak memory per chip for a training step, and the smallest expert x fsdp x tensor mesh that fits it.

What is counted (bytes per chip; maxlm's defaults: f32 parameters, AdamW, bf16 compute):

- parameters, gradients and the two Adam moments in f32 (4 + 4 + 8 bytes per parameter), sharded the way
  maxlm's default `mesh.rules` (maxlm/config.py DEFAULT_RULES) place them: every weight's `embed` dimension on
  fsdp and its heads/mlp/vocab dimension on tensor (ZeRO-3-style, Rajbhandari et al. 2020), replicated over
  `data`; the routed experts of an MoE (logical axes ("exp", "embed", "mlp"), maxlm/model/moe.py) are further
  split E/expert per chip over `expert`, which the dense weights are replicated over:
      state bytes = 16 x (N_dense / (fsdp x tensor) + N_routed / (expert x fsdp x tensor)),
  with N_routed = MoE layers x E x 3 d_model F (`routed_expert_params`) and N_dense the rest (attention, norms,
  router, embedding, head). The router ([D, E], ("embed", None)) is in fact not split over tensor; it is D x E
  parameters per layer, left in N_dense for simplicity;
- a layer workspace: the bf16 copy of one layer's weights (two when fsdp > 1: the all-gathered current layer and
  the prefetched next one) plus that layer's f32 weight gradients before they are reduce-scattered; of an MoE
  layer's experts only the E / expert local ones are gathered (moe.py's shard_map takes them as P(exp, None, mlp));
  the whole (sharded) layer stack cast to bf16 once before the layer scan;
- with `train.grad_accum` > 1, a second f32 gradient: the running sum beside the current microbatch's;
- activations saved for the backward pass, per token per layer, as XLA's buffer assignment of the compiled step
  shows them in the layer scan's residual stacks (maxlm's block: RMSNorm computed in f32, GQA attention, SwiGLU;
  the itemisation of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  Sec. 4, with the dtypes XLA actually keeps), under the remat policy (`model.remat`, jax.checkpoint_policies):
    none          every tensor the backward reads: both RMSNorms' f32 input and normalised value (four d-wide
                  f32), their bf16 outputs, q after RoPE and the attention output, k, v, six F-wide SwiGLU tensors
                  (gate, up, the sigmoid, silu(gate), the product and its cast), and with XLA attention its
                  probabilities in f32 and bf16 (6 bytes per score) with the softmax max and sum;
    dots          matmul outputs only (checkpoint_dots): q, k, v, the o and down projections, gate, up, and with
                  XLA attention its QK^T logits (f32: the dot accumulates in f32) and AV output;
    dots_no_batch weight-matmul outputs only (checkpoint_dots_with_no_batch_dims): attention dots are recomputed;
    full          only each layer's input (the scan carry);
  plus the working set of the one layer being differentiated. Under none, with XLA attention, the f32 gradient of
  the probabilities (4 bytes per score; the softmax gradient itself is fused into the dQ/dK matmuls). Under dots:
  what the policy did not save, recomputed (the probabilities among them, in f32 and bf16) beside that gradient
  (10 bytes per score). Under full and dots_no_batch, where the whole layer is recomputed inside one
  computation, XLA fuses the elementwise work and the softmax gradient into the matmuls: live are the recomputed
  matmul outputs (q, k, v, AV, o, gate, up, down; in MoE layers the experts' rows and exchange buffers) and the
  probabilities in f32 and bf16 (6 bytes per score). Tensors with a heads/mlp dimension are split over `tensor`;
  d_model-wide ones are replicated over it (maxlm has no sequence parallelism);
- MoE layers (the planner writes dropless configs: `model.capacity_factor` 0): each token's K experts run the
  SwiGLU on K rows, plus the d_model-wide rows gathered for them and their outputs before the combine (2K rows).
  With expert parallelism over S = `expert` shards, maxlm's dropless all-to-all pads every chunk to the worst
  case (moe.py `_exchange_dropless`: S x M rows per device for M local assignments), so the grouped SwiGLU runs
  on S x K rows per token and the send/receive buffers of the two exchanges add 4 S K d_model-wide rows. That
  padding is not small: at S = 8, K = 2 the in-flight MoE layer holds 16 rows of gate/up/hidden per token
  instead of 2, so expert parallelism mostly pays off under `full` remat or with few rows per microbatch (a
  `ragged_all_to_all` exchange would remove the factor S; XLA:CPU does not implement it). The expert matmuls
  are `ragged_dot`s, not `dot_general`s, so the `dots` policies do not save them: in MoE layers they are
  recomputed like the rest (only `none` keeps them for every layer);
- the logits: one f32 [rows, T, V] buffer (vocab split over tensor): XLA fuses the log-softmax and its gradient
  into the LM head's matmuls, so the logits or their gradient are live, not both; and the boolean document mask
  [rows, 1, T, T]. They are live while the loss and the LM head are differentiated, before the layer scan's
  backward starts, so the peak is the state and the saved activations plus the larger of (logits, gathered
  embedding and head) and (gathered layer, layer working set): `MemoryEstimate.total`.

The terms were checked against XLA's peak on the grid of tests/benchmarks/bench_memory_calibration.py (dense and
MoE, remat none/dots/full, meshes fsdp8, d2f2t2, e4f2; tests/test_memory_calibration.py keeps the small one):
within 15% on every TPU point (small on v4, ~1B on v5p) and on GPU (h100x8) but for MoE under full remat with
expert parallelism, which XLA:GPU holds ~35% above the estimate. On GPU targets XLA's peak is its temporary
buffer, a packed heap, which can exceed the largest simultaneous live set by a few tens of percent on small
programs. On TPU v5e, memory-space assignment keeps up to ~110 MiB of a program in VMEM, out of the HBM peak.

With cuDNN flash attention (maxlm's `auto` on GPU) the T x T score matrix is never stored; with XLA attention
(CPU/TPU) it is. XLA's own temporaries, fragmentation and the runtime are covered by using only
`USABLE_HBM_FRACTION` of HBM: this is an estimate to pick a mesh, not a guarantee.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from maxlm.config import REMAT_NAMES, ModelConfig
from maxlm.flops import ParamCount, mlp_params
from maxlm.plan.shape import MoESpec

PARAM_BYTES = 4  # model.param_dtype float32
ACT_BYTES = 2  # bf16 compute dtype off CPU
STATE_BYTES_PER_PARAM = 4 + 4 + 8  # params, grads, Adam mu and nu (f32)
USABLE_HBM_FRACTION = 0.9
MAX_TENSOR = 8  # tensor parallelism stays inside one NVLink / ICI-local group

# The order in which the planner tries `model.remat` policies: least recompute first.
REMAT_BY_RECOMPUTE = ("none", "dots", "dots_no_batch", "full")
assert set(REMAT_BY_RECOMPUTE) == set(REMAT_NAMES)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per chip of one training step on one mesh (data x fsdp x tensor x expert chips)."""

    remat: str
    data: int
    fsdp: int
    tensor: int
    expert: int  # expert-parallel shards: each chip holds num_experts / expert routed experts (1 for dense)
    grad_accum: int
    micro_rows: int  # rows per data-parallel rank per microbatch
    params: float
    grads: float
    optimizer: float
    workspace: float  # gathered layer weights, their f32 gradient and the bf16 layer stack
    activations: float  # the saved tensors of every layer (the layer scan's residual stacks)
    logits: float  # the loss's f32 logits buffer, the attention mask and the gathered embedding / LM head
    working: float = 0.0  # the layer being differentiated: what it recomputes and its attention gradients

    @property
    def total(self) -> float:
        """The peak: state and saved activations throughout, plus the larger of the two phases that follow the
        forward pass. The loss and the LM head's backward run first (logits live, no layer in flight); by the time
        the layer scan's backward runs they are freed, and a gathered layer and its working set are live."""
        return (self.params + self.grads + self.optimizer + self.activations
                + max(self.logits, self.workspace + self.working))

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


def routed_expert_params(m: ModelConfig) -> tuple[int, int]:
    """(whole model, one MoE layer) parameters of the routed experts: the only weights `mesh.expert` splits.

    They are the MoE block's gate/up [E, D, F] and down [E, F, D] (logical axes ("exp", ...), moe.py), i.e. the
    E x mlp_params(D, F) term of `maxlm.flops.moe_params`; its router and shared experts are replicated over
    `expert` like every dense weight. 0 for a dense model.
    """
    if m.ffn != "moe":
        return 0, 0
    per_layer = m.num_experts * mlp_params(m.d_model, m.moe_ffn_dim or m.ffn_dim)
    return m.num_moe_layers * per_layer, per_layer


def activation_bytes_per_token(m: ModelConfig, moe: MoESpec | None, seq_len: int, tensor: int, remat: str,
                               flash: bool, expert: int = 1) -> tuple[float, float]:
    """(saved per layer, working set of the one layer in flight), bytes per token on one chip.

    The saved tensors are those XLA keeps in the scan's residual stacks (read from the buffer assignment of
    `maxlm compile`'s train step; see the module docstring for the list per policy). The working set is what the
    layer being differentiated holds beyond them (see below). `expert` is the expert-parallel size S: with S > 1
    the dropless exchange pads to S x K rows per token (see the module docstring), which only MoE layers pay.
    """
    d, t, T, H = m.d_model, tensor, seq_len, m.n_heads
    hd = m.head_dim_resolved
    q, kv = H * hd, 2 * m.n_kv_heads * hd  # query width; key + value width
    if moe is None:
        f_none = 6 * m.ffn_dim  # gate, up, silu's sigmoid, silu(gate), silu(gate) * up and its cast: 6 F-wide
        f_dots = 2 * m.ffn_dim  # gate and up are dot_generals: the `dots` policies keep them
        f_recomputed = 0  # (already among the weight dots)
        dispatch = dispatch_saved = 0.0
        router = 0.0
    else:
        k, s = moe.experts_per_token, expert
        rows = k * s if s > 1 else k  # rows per token the grouped SwiGLU runs on (padded exchange when s > 1)
        f_none = 6 * (m.moe_ffn_dim or m.ffn_dim) * rows
        f_dots = 0  # ragged_dot is not a dot_general: recomputed under `dots` / `dots_no_batch`
        f_recomputed = 2 * (m.moe_ffn_dim or m.ffn_dim) * rows  # the experts' gate and up, recomputed
        # in flight: d_model-wide rows gathered for the experts and their outputs (2k), + the send/receive buffers
        # of both exchanges; saved (none): the rows the grouped matmuls read (bf16), each assignment's output in
        # f32 before the weighted combine, and with s > 1 the boolean padding mask of the send buffer
        dispatch = ACT_BYTES * d * (2 * k + (4 * s * k if s > 1 else 0))
        dispatch_saved = d * (ACT_BYTES * rows + 4 * k + (rows if s > 1 else 0))
        router = 4.0 * moe.num_experts  # f32 router logits
    # XLA attention keeps its probabilities in f32 and bf16 (6 bytes per score) and the softmax max and sum (f32);
    # cuDNN's flash kernel keeps only its output (counted with q) and a f32 log-sum-exp per head.
    scores_none = 0.0 if flash else 6.0 * H * T / t
    stats = (4.0 if flash else 8.0) * H / t
    qk_normed = ACT_BYTES * (q + kv / 2) / t if m.qk_norm else 0.0  # QK-norm: q and k before their RMSNorm
    # none: both RMSNorms' f32 input and normalised value (4 d-wide f32) and their bf16 outputs (2 d-wide); q after
    # RoPE and the attention output (2 q-wide), k and v; the SwiGLU's F-wide tensors; the softmax
    none = (4 * 4 * d + ACT_BYTES * (2 * d + (2 * q + kv + f_none) / t) + qk_normed + scores_none + stats + router
            + dispatch_saved)
    # the weight-matmul outputs: q, k, v, the o and down projections (2 d-wide), gate and up
    weight_dots = ACT_BYTES * (2 * d + (q + kv + f_dots) / t) + router
    if remat == "none":
        saved = none
    elif remat == "dots":
        # + XLA attention's two batched dots: the QK^T logits (f32: preferred_element_type) and the AV output
        saved = weight_dots + (0.0 if flash else 4.0 * H * T / t + ACT_BYTES * q / t)
    elif remat == "dots_no_batch":
        saved = weight_dots
    elif remat == "full":
        saved = ACT_BYTES * d  # the layer input (the scan carry)
    else:
        raise ValueError(f"unknown remat policy {remat!r}")
    # The layer in flight (XLA attention; cuDNN's kernel keeps no T x T buffer). With every tensor saved (none)
    # its attention backward adds the f32 gradient of the probabilities, dP (XLA fuses dS = P (dP - rowsum(dP P))
    # into the dQ/dK matmuls). With its dots saved (dots) it recomputes the rest, the probabilities among them
    # (f32 and bf16, from the saved f32 QK^T), beside dP: 10 bytes per score. Recomputing the whole layer (full,
    # dots_no_batch), XLA fuses the elementwise work into the matmuls: the recomputed matmul outputs and the
    # probabilities in f32 and bf16 (6 bytes per score) are what is live.
    if remat == "none":  # the saved probabilities are read in place; only the f32 gradient dP is new
        working = 0.0 if flash else 4.0 * H * T / t
    elif remat == "dots":  # the probabilities recomputed from the saved f32 QK^T (f32 and bf16) and dP
        working = max(none - saved, 0.0) + (0.0 if flash else 10.0 * H * T / t)
    else:
        # (in MoE layers the recomputed matmuls include the experts' gate and up rows and the exchange buffers)
        working = weight_dots + ACT_BYTES * (q + f_recomputed) / t + dispatch + scores_none + stats
    return saved, working


def estimate_memory(m: ModelConfig, moe: MoESpec | None, count: ParamCount, seq_len: int, *, micro_rows: int,
                    data: int, fsdp: int, tensor: int, grad_accum: int, remat: str, flash: bool,
                    expert: int = 1, platform: str = "tpu") -> MemoryEstimate:
    """Bytes per chip on a data x fsdp x tensor x expert mesh; `micro_rows` rows per chip (per rank of
    data x fsdp x expert, the axes of `act_batch`) per microbatch. `expert` splits only the routed experts.
    `platform` "cuda": XLA:GPU materialises the f32 logits and their gradient as two buffers (TPU fuses them)."""
    routed, routed_per_layer = routed_expert_params(m) if moe is not None else (0, 0)
    shard = fsdp * tensor  # dense weights
    expert_shard = expert * fsdp * tensor  # routed experts: ("exp", "embed", "mlp") -> (expert, fsdp, tensor)
    saved, working = activation_bytes_per_token(m, moe, seq_len, tensor, remat, flash, expert)
    tokens = micro_rows * seq_len
    layer_copies = 2 if fsdp > 1 else 1
    layer_params = count.per_layer - routed_per_layer + routed_per_layer / expert  # only local experts gathered
    workspace = layer_params * (layer_copies * ACT_BYTES + PARAM_BYTES) / tensor
    layer_stack = count.per_layer * m.n_layers - routed + routed / expert
    workspace += layer_stack * ACT_BYTES / shard  # the whole layer stack cast to bf16 once, before the scan
    # one [rows, T, V] f32 buffer (the logits or their gradient: XLA fuses the log-softmax into its consumers) and
    # the boolean document mask [rows, 1, T, T]; with fsdp > 1 the gathered bf16 embedding table and LM head
    logits_buffers = 2 if platform == "cuda" else 1
    logits = logits_buffers * tokens * m.vocab_size * 4 / tensor + micro_rows * seq_len * seq_len
    if fsdp > 1:
        logits += (count.embedding + count.lm_head) * ACT_BYTES / tensor

    def state(bytes_per_param: int) -> float:
        return (count.total - routed) * bytes_per_param / shard + routed * bytes_per_param / expert_shard

    # with accumulation the f32 running sum of the microbatch gradients sits beside the current microbatch's
    grad_copies = 2 if grad_accum > 1 else 1
    blocked = 0.0
    if moe is not None and platform == "cuda":
        # maxlm's GPU grouped matmul (`blocked`, maxlm/model/grouped_matmul.py) runs each block of rows against its
        # own gathered [D, F] weight copy (bf16) and, in the backward, forms each block's f32 weight gradient
        # before summing them per expert: N x D x F x (2 + 4) bytes for the matmul in flight, N = ceil(M / Q) + L
        # blocks for M local rows and L local experts (Q as `block_rows`: ~a quarter of an even group, 16..1024)
        s_ = expert if expert > 1 else 1
        rows, local = micro_rows * seq_len * moe.experts_per_token * s_, max(moe.num_experts // s_, 1)
        q_rows = int(min(1024, max(16, 1 << (max(rows // (4 * local), 1).bit_length() - 1))))
        blocks = -(-rows // q_rows) + local
        blocked = blocks * m.d_model * (m.moe_ffn_dim or m.ffn_dim) / tensor * (ACT_BYTES + 4)

    return MemoryEstimate(
        remat=remat, data=data, fsdp=fsdp, tensor=tensor, expert=expert, grad_accum=grad_accum,
        micro_rows=micro_rows, params=state(PARAM_BYTES), grads=grad_copies * state(PARAM_BYTES), optimizer=state(8),
        workspace=workspace, activations=tokens * m.n_layers * saved, logits=logits, working=tokens * working + blocked)


def estimate_for_config(cfg: Any, mesh_shape: dict[str, int], platform: str = "tpu") -> MemoryEstimate:
    """The estimate for a maxlm Config on a resolved mesh (what `maxlm compile` and `maxlm plan --verify` set
    beside XLA's peak). Flash attention is assumed only where the config's attention is cuDNN."""
    from maxlm.flops import count_params

    m = cfg.model
    moe = MoESpec(m.num_experts, m.experts_per_token) if m.ffn == "moe" else None
    batch_ranks = mesh_shape["data"] * mesh_shape["fsdp"] * mesh_shape["expert"]
    return estimate_memory(m, moe, count_params(m), cfg.data.seq_len,
                           micro_rows=max(1, cfg.micro_batch_size // batch_ranks), data=mesh_shape["data"],
                           fsdp=mesh_shape["fsdp"], tensor=mesh_shape["tensor"], grad_accum=cfg.train.grad_accum,
                           remat=m.remat, flash=m.attention == "cudnn", expert=mesh_shape["expert"],
                           platform=platform)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def mesh_candidates(m: ModelConfig, chips: int, num_experts: int = 1) -> list[tuple[int, int, int]]:
    """(expert, fsdp, tensor) triples that maxlm's `validate` accepts for this shape, least sharded first.

    `expert` ranges over the divisors of `num_experts` (1 for a dense model: then this is the fsdp x tensor
    search it always was), and expert x fsdp x tensor must divide `chips` (the rest is `data`). Sharding is
    measured by expert x fsdp x tensor; among equal sharding, expert before fsdp before tensor: expert
    parallelism splits the experts without gathering their weights (each chip runs whole experts on the tokens
    sent to it); fsdp's all-gathers overlap with compute; tensor parallelism needs the fastest links. (maxlm's
    dropless exchange pads its all-to-all to S x K rows per token, so at large S and many rows per chip its
    traffic can exceed fsdp's weight gathers; the memory estimate charges the padded buffers, and a mesh whose
    buffers do not fit is passed over for the next one.)
    """
    out = []
    for t in _divisors(chips):
        if (t > MAX_TENSOR or m.n_heads % t or m.n_kv_heads % t or m.ffn_dim % t or m.vocab_size % t
                or (m.moe_ffn_dim or m.ffn_dim) % t):
            continue
        for e in _divisors(chips // t):
            if num_experts % e:
                continue
            for f in _divisors(chips // (t * e)):
                if m.d_model % f == 0:
                    out.append((e, f, t))
    return sorted(out, key=lambda eft: (eft[0] * eft[1] * eft[2], eft[2], eft[1]))


def choose_mesh(m: ModelConfig, moe: MoESpec | None, count: ParamCount, seq_len: int, *, global_rows: int,
                chips: int, hbm_bytes: float, remat: str = "full", flash: bool = True,
                platform: str = "cuda") -> MeshChoice:
    """The smallest expert x fsdp x tensor mesh (the rest of the chips go to `data`) whose step fits in HBM.

    Order of preference: no gradient accumulation before accumulation; with `remat="auto"`, the policy with the
    least recomputation that fits (none, dots, dots_no_batch, full) and the smallest mesh for it; then the fixed
    or most frugal policy with more microbatches (any divisor of the rows per data-parallel rank). Meshes are
    tried in `mesh_candidates` order (least sharding first; experts on `expert` before fsdp before tensor). The
    batch is split over data x fsdp x expert (`act_batch`), i.e. chips / tensor ranks, whatever the split. When
    nothing fits, the most frugal option is returned with `fits=False` so the plan can show how far off it is.
    """
    usable = USABLE_HBM_FRACTION * hbm_bytes
    meshes = mesh_candidates(m, chips, moe.num_experts if moe else 1)
    if not meshes:
        meshes = [(1, 1, 1)]
    policies = REMAT_BY_RECOMPUTE if remat == "auto" else (remat,)
    last = "full" if remat == "auto" else remat

    def est(e: int, f: int, t: int, policy: str, accum: int) -> MemoryEstimate | None:
        dp = chips // t  # data x fsdp x expert: the mesh axes of act_batch
        if global_rows % (dp * accum):
            return None
        return estimate_memory(m, moe, count, seq_len, micro_rows=global_rows // (dp * accum), data=dp // (f * e),
                               fsdp=f, tensor=t, expert=e, grad_accum=accum, remat=policy, flash=flash,
                               platform=platform)

    frugal: MemoryEstimate | None = None

    def consider(e: MemoryEstimate | None) -> bool:
        nonlocal frugal
        if e is None:
            return False
        if frugal is None or e.total < frugal.total:
            frugal = e
        return e.total <= usable

    for policy in policies:
        for e, f, t in meshes:
            cand = est(e, f, t, policy, 1)
            if consider(cand):
                return MeshChoice(cand, True, hbm_bytes)
    accums = sorted({a for t in {t for _, _, t in meshes} for a in _divisors(global_rows // (chips // t)) if a > 1})
    for accum in accums:
        for e, f, t in meshes:
            cand = est(e, f, t, last, accum)
            if consider(cand):
                return MeshChoice(cand, True, hbm_bytes)
    if frugal is None:  # no mesh divides the batch: report the most sharded one with one row per rank
        e, f, t = max(meshes, key=lambda eft: (eft[0] * eft[1] * eft[2], eft[1]))
        frugal = estimate_memory(m, moe, count, seq_len, micro_rows=1, data=chips // (e * f * t), fsdp=f, tensor=t,
                                 expert=e, grad_accum=1, remat=last, flash=flash, platform=platform)
    return MeshChoice(frugal, False, hbm_bytes)
