"""Mixture-of-Experts feed-forward block: router, dropless and capacity expert paths, expert parallelism.

Shape letters: B rows, T positions, D d_model, E routed experts, K experts per token (top-k), F expert hidden size,
M token-expert assignments (B*T*K, or K*T within one row), C slots per expert per sequence (capacity path),
S expert-parallel shards (the size of the mesh axes that the logical `exp` axis maps to), L = E / S local experts.

Routing runs on the global (batch-sharded) arrays. The experts run inside `jax.shard_map` over the whole mesh,
each device on its own rows, so sorting and grouping are local (no global sort); with S > 1 the assignments are
exchanged with `all_to_all` over the expert axes so each device runs only its L experts. Every shape is static:
the dropless path pads the exchange to the worst case, the capacity path drops what does not fit.

Parameters (per MoE layer; Mixtral's names in brackets, HF stores [out, in] so each is transposed):
  router       [D, E]  (`block_sparse_moe.gate.weight` [E, D])
  gate, up     [E, D, F]  (`experts.{e}.w1`, `experts.{e}.w3`, each [F, D])
  down         [E, F, D]  (`experts.{e}.w2` [D, F])
  router_bias  [E]  (sigmoid routing only: DeepSeek-V3's `e_score_correction_bias`; not trained by gradients)
  shared_gate, shared_up [D, shared_experts * F], shared_down [shared_experts * F, D]  (DeepSeekMoE shared experts)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from maxlm.config import ModelConfig
from maxlm.model.grouped_matmul import blocked_grouped_matmul, block_rows, tiled_grouped_matmul, tile_rows
from maxlm.model.layers import compute_dtype, constrain, param, swiglu
from maxlm.model.lora import LoraSpec, adapted_experts, adapts
from maxlm.model.stack import layer_path

Axes = tuple[str, ...]


# ----------------------------------------------------------------------------------------------------------
# Router and its losses


class Routing(NamedTuple):
    """The router's decision for every token (all float32)."""

    expert_ids_BTK: jax.Array  # int32, the K chosen experts, best first
    weights_BTK: jax.Array  # combine weights of those experts
    probs_BTE: jax.Array  # the router's distribution over experts (what the balance loss pushes towards uniform)


def route(logits_BTE: jax.Array, bias_E: jax.Array | None, cfg: ModelConfig) -> Routing:
    """Top-k routing from float32 router logits.

    softmax (Mixtral, Jiang et al. 2024 eq. 1: y = sum_i Softmax(Top2(x W_g))_i SwiGLU_i(x)): softmax over all E,
      keep the top k, renormalise them to sum to 1 (the same as a softmax over the k kept logits).
    sigmoid (DeepSeek-V3, arXiv:2412.19437 eqs. 13-16): s = sigmoid(logits); experts are *selected* by s + b with
      a per-expert bias b that only balancing moves (never gradients), but *weighted* by s alone, then
      normalised over the k chosen; `router_scale` is their routed_scaling_factor.
    """
    K = cfg.experts_per_token
    if cfg.router_scoring == "softmax":
        probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
        weights_BTK, ids_BTK = jax.lax.top_k(probs_BTE, K)
    else:
        scores_BTE = jax.nn.sigmoid(logits_BTE)
        select_BTE = scores_BTE if bias_E is None else scores_BTE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
        _, ids_BTK = jax.lax.top_k(select_BTE, K)
        weights_BTK = jnp.take_along_axis(scores_BTE, ids_BTK, axis=-1)
        # DeepSeek-V3 eq. 19: the balance statistics use scores normalised over the experts.
        probs_BTE = scores_BTE / jnp.sum(scores_BTE, axis=-1, keepdims=True)
    if cfg.router_renormalize:
        weights_BTK = weights_BTK / (jnp.sum(weights_BTK, axis=-1, keepdims=True) + 1e-20)
    return Routing(ids_BTK.astype(jnp.int32), weights_BTK * cfg.router_scale, probs_BTE)


def expert_counts(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """Assignments per expert [E] (int32: float32 counts stop being exact above 2^24 assignments)."""
    return jnp.bincount(expert_ids.reshape(-1), length=num_experts)


def load_balance_loss(probs_NE: jax.Array, expert_ids_NK: jax.Array) -> jax.Array:
    """Switch Transformer (Fedus et al. 2022, eqs. 4-6) as Mixtral trains it: E * sum_e f_e * P_e.

    f_e = (tokens that picked e among their top k) / tokens: the hard load, no gradient; it sums to k, as in
    Hugging Face's `load_balancing_loss_func`, so a perfectly balanced router scores k (Switch's top-1: 1).
    P_e = mean router probability of e: the differentiable part. Leading axes of both inputs are tokens.
    """
    E = probs_NE.shape[-1]
    probs_NE = probs_NE.reshape(-1, E)
    n_tokens = probs_NE.shape[0]
    f_E = expert_counts(expert_ids_NK, E).astype(jnp.float32) / n_tokens
    p_E = jnp.mean(probs_NE, axis=0)
    return E * jnp.sum(f_E * p_E)


def router_z_loss(logits_NE: jax.Array) -> jax.Array:
    """ST-MoE (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(router logits)^2; keeps logits small so the
    float32 router softmax stays accurate."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE.astype(jnp.float32), axis=-1)))


def capacity_per_sequence(cfg: ModelConfig, seq_len: int) -> int:
    """Slots per expert per sequence, ceil(capacity_factor * T * K / E), at most T (a token picks an expert at most
    once, so T slots can never overflow); 0 for the dropless path."""
    if cfg.capacity_factor <= 0:
        return 0
    c = math.ceil(cfg.capacity_factor * seq_len * cfg.experts_per_token / cfg.num_experts)
    return max(1, min(seq_len, c))


# ----------------------------------------------------------------------------------------------------------
# Expert computation (runs per device inside shard_map, or on the whole batch without a mesh)


@dataclass(frozen=True)
class ExpertLayout:
    """Where the expert computation's operands live on the mesh, read from the logical rules (never hard-coded)."""

    mesh: Any  # the abstract mesh of the surrounding `jax.set_mesh`
    batch: Axes  # mesh axes splitting rows (`act_batch`)
    expert: Axes  # mesh axes splitting experts (`exp`), each of size > 1
    tensor: Axes  # mesh axes splitting the expert hidden size (`mlp`), each of size > 1
    shards: int  # S: product of the expert axes' sizes

    @staticmethod
    def current(batch_rows: int) -> ExpertLayout | None:
        """The layout under the active mesh and rules, or None to run unsharded (no mesh, or a batch that the
        data-parallel axes do not divide, e.g. parameter init with one row: XLA then partitions it as it likes)."""
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            return None
        # One name per call: within one array a mesh axis is used once, and `exp` shares `expert` with act_batch.
        spec = [nn.logical_to_mesh_axes((name,))[0] for name in ("act_batch", "exp", "mlp")]

        def axes(entry: Any) -> Axes:
            names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            return tuple(a for a in names if mesh.shape[a] > 1)

        batch, expert, tensor = axes(spec[0]), axes(spec[1]), axes(spec[2])
        if batch_rows % math.prod(mesh.shape[a] for a in batch):
            return None
        if set(tensor) & set(batch) or not set(expert) <= set(batch):
            raise ValueError(f"MoE needs the `exp` mesh axes {expert} inside act_batch {batch} and the `mlp` axes "
                             f"{tensor} outside it; fix mesh.rules")
        return ExpertLayout(mesh, batch, expert, tensor, math.prod(mesh.shape[a] for a in expert))


def _axis_name(axes: Axes) -> str | Axes:
    return axes[0] if len(axes) == 1 else axes


def _spec(axes: Axes) -> str | Axes | None:
    return None if not axes else _axis_name(axes)


def grouped_matmul_impl(cfg: ModelConfig) -> str:
    """`auto`: `tiled` on CPU and `blocked` on GPU, where XLA lowers `ragged_dot` to one dense matmul over every
    group (E times the work; maxlm/model/grouped_matmul.py); `ragged_dot` on TPU."""
    if cfg.moe_matmul != "auto":
        return cfg.moe_matmul
    return {"cpu": "tiled", "gpu": "blocked"}.get(jax.default_backend(), "ragged_dot")


def _grouped_swiglu(x_MD: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array, w_down_EFD: jax.Array,
                    sizes_E: jax.Array, impl: str) -> jax.Array:
    """SwiGLU of rows sorted by expert: rows [sum(sizes[:e]), sum(sizes[:e+1])) use expert e. Rows past
    sum(sizes) come out 0."""
    if impl == "ragged_dot":
        gate_MF = jax.lax.ragged_dot(x_MD, w_gate_EDF, sizes_E)
        up_MF = jax.lax.ragged_dot(x_MD, w_up_EDF, sizes_E)
        return jax.lax.ragged_dot(jax.nn.silu(gate_MF) * up_MF, w_down_EFD, sizes_E)
    # Gate and up in one grouped matmul: the rows are gathered once and the product is twice as wide.
    if impl == "blocked":
        mm = partial(blocked_grouped_matmul, block=block_rows(x_MD.shape[0], sizes_E.shape[0]))
    else:
        mm = partial(tiled_grouped_matmul, tile=tile_rows(x_MD.shape[0]))
    gate_MF, up_MF = jnp.split(mm(x_MD, jnp.concatenate([w_gate_EDF, w_up_EDF], axis=-1), sizes_E), 2, axis=-1)
    return mm(jax.nn.silu(gate_MF) * up_MF, w_down_EFD, sizes_E)


def _batched_swiglu(x_ECD: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array, w_down_EFD: jax.Array
                    ) -> jax.Array:
    """SwiGLU of a fixed number of rows per expert: dense batched matmuls, no grouping needed."""
    gate_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, w_gate_EDF)
    up_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, w_up_EDF)
    return jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate_ECF) * up_ECF, w_down_EFD)


def _inverse_permutation(order_M: jax.Array) -> jax.Array:
    return jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=order_M.dtype))


def _dropless_local(x_BTD: jax.Array, ids_BTK: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                    *, num_experts: int, expert_axes: Axes, shards: int, impl: str) -> jax.Array:
    """Every assignment is computed: returns each assignment's expert output [B, T, K, D] (not yet weighted).

    Sort the M = B*T*K assignments by expert (stable: ties keep token order), gather their rows, run the grouped
    matmuls, unsort. With S > 1 shards the sorted rows are first sent to the shard owning their expert.
    """
    B, T, K = ids_BTK.shape
    D = x_BTD.shape[-1]
    ids_M = ids_BTK.reshape(-1)  # assignment m is token m // K, choice m % K
    order_M = jnp.argsort(ids_M, stable=True)
    xs_MD = x_BTD.reshape(B * T, D)[order_M // K]
    sizes_E = expert_counts(ids_M, num_experts)
    if shards == 1:
        ys_MD = _grouped_swiglu(xs_MD, w_gate, w_up, w_down, sizes_E, impl)
    else:
        ys_MD = _exchange_dropless(xs_MD, sizes_E, w_gate, w_up, w_down, expert_axes, shards, impl)
    return ys_MD[_inverse_permutation(order_M)].reshape(B, T, K, D)


def _exchange_dropless(xs_MD: jax.Array, sizes_E: jax.Array, w_gate_LDF: jax.Array, w_up_LDF: jax.Array,
                       w_down_LFD: jax.Array, expert_axes: Axes, shards: int, impl: str) -> jax.Array:
    """Expert parallelism without drops: rows sorted by expert go to the shard that owns their expert and back.

    `all_to_all` needs equal static chunks, and any shard may receive all M of a source's rows, so each chunk is
    padded to M rows (memory S*M rows per device; `ragged_all_to_all` would send only the real rows but XLA:CPU
    does not implement it). Received rows are regrouped by local expert with a stable sort; padding rows sort
    last, beyond the group sizes, and come out 0.
    """
    M, D = xs_MD.shape
    S = shards
    L = w_gate_LDF.shape[0]
    axis = _axis_name(expert_axes)
    sizes_SL = sizes_E.reshape(S, L)  # my rows for each shard's local experts
    send_S = jnp.sum(sizes_SL, axis=1)
    start_S = jnp.cumsum(send_S) - send_S
    i_M = jnp.arange(M)
    src_SM = jnp.minimum(start_S[:, None] + i_M[None, :], M - 1)
    valid_SM = i_M[None, :] < send_S[:, None]
    send_SMD = jnp.where(valid_SM[..., None], xs_MD[src_SM], 0).astype(xs_MD.dtype)
    recv_SMD = jax.lax.all_to_all(send_SMD, axis, 0, 0, tiled=True)  # recv[s]: the rows source s sent me
    recv_sizes_SL = jax.lax.all_to_all(sizes_SL, axis, 0, 0, tiled=True)  # [source, local expert]
    ends_SL = jnp.cumsum(recv_sizes_SL, axis=1)
    # Local expert of row i from source s: how many of that source's group ends lie at or before i (L: padding).
    local_SM = jnp.sum(i_M[None, :, None] >= ends_SL[:, None, :], axis=-1)
    local_R = local_SM.reshape(S * M)
    order_R = jnp.argsort(local_R, stable=True)
    rows_RD = recv_SMD.reshape(S * M, D)[order_R]
    out_RD = _grouped_swiglu(rows_RD, w_gate_LDF, w_up_LDF, w_down_LFD, jnp.sum(recv_sizes_SL, axis=0), impl)
    back_SMD = out_RD[_inverse_permutation(order_R)].reshape(S, M, D)
    back_SMD = jax.lax.all_to_all(back_SMD, axis, 0, 0, tiled=True)  # back[s, i]: my row start_S[s] + i
    shard_M = jnp.sum(i_M[:, None] >= jnp.cumsum(send_S)[None, :], axis=-1)  # the shard sorted row m went to
    return back_SMD[shard_M, i_M - start_S[shard_M]]


def _capacity_local(x_BTD: jax.Array, ids_BTK: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                    *, num_experts: int, capacity: int, expert_axes: Axes, shards: int) -> tuple[jax.Array, jax.Array]:
    """Fixed capacity: each sequence offers every expert C slots. Returns each assignment's expert output
    [B, T, K, D] (0 where dropped) and the kept mask [B, T, K].

    Drop order, per sequence: all first choices are placed before any second choice (and so on down the top k),
    and within one rank earlier positions come first (GShard's order, Lepikhin et al. 2020): a token loses its
    k-th expert only after every token's better choices found room. Capacity is per sequence, not per device,
    so which assignments drop does not depend on the mesh.
    """
    B, T, K = ids_BTK.shape
    D = x_BTD.shape[-1]
    E, C, S = num_experts, capacity, shards
    M = K * T
    ids_BM = ids_BTK.transpose(0, 2, 1).reshape(B, M)  # m = k * T + t: rank-major priority order
    order_BM = jnp.argsort(ids_BM, axis=-1, stable=True)
    sizes_BE = jax.vmap(partial(expert_counts, num_experts=E))(ids_BM)
    start_BE = jnp.cumsum(sizes_BE, axis=-1) - sizes_BE
    # Slot c of expert e holds the c-th assignment (in priority order) that chose e, if there is one.
    c_C = jnp.arange(C)
    sorted_idx_BEC = jnp.minimum(start_BE[..., None] + c_C, M - 1)
    filled_BEC = c_C < sizes_BE[..., None]
    m_BX = jnp.take_along_axis(order_BM, sorted_idx_BEC.reshape(B, E * C), axis=-1)  # X = E * C slots
    x_BXD = jnp.take_along_axis(x_BTD, (m_BX % T)[..., None], axis=1)
    x_BXD = jnp.where(filled_BEC.reshape(B, E * C, 1), x_BXD, 0).astype(x_BTD.dtype)
    x_EYD = x_BXD.reshape(B, E, C, D).transpose(1, 0, 2, 3).reshape(E, B * C, D)  # Y = B * C rows per expert
    if S > 1:  # GShard dispatch: [E, Y] -> [L, S * Y], experts to their shard, rows from every source
        x_EYD = jax.lax.all_to_all(x_EYD, _axis_name(expert_axes), 0, 1, tiled=True)
    y_EYD = _batched_swiglu(x_EYD, w_gate, w_up, w_down)
    if S > 1:
        y_EYD = jax.lax.all_to_all(y_EYD, _axis_name(expert_axes), 1, 0, tiled=True)
    y_BXD = y_EYD.reshape(E, B, C, D).transpose(1, 0, 2, 3).reshape(B, E * C, D)
    # Each assignment's slot: its rank among the assignments that chose the same expert.
    rank_sorted_BM = jnp.arange(M) - jnp.take_along_axis(start_BE, jnp.take_along_axis(ids_BM, order_BM, -1), -1)
    pos_BM = jax.vmap(lambda r, o: r[_inverse_permutation(o)])(rank_sorted_BM, order_BM)
    kept_BM = pos_BM < C
    slot_BM = ids_BM * C + jnp.minimum(pos_BM, C - 1)
    out_BMD = jnp.where(kept_BM[..., None], jnp.take_along_axis(y_BXD, slot_BM[..., None], axis=1), 0)
    out_BTKD = out_BMD.reshape(B, K, T, D).transpose(0, 2, 1, 3)
    return out_BTKD, kept_BM.reshape(B, K, T).transpose(0, 2, 1)


def _experts_local(x_BTD: jax.Array, ids_BTK: jax.Array, weights_BTK: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, *, num_experts: int, capacity: int, expert_axes: Axes, tensor_axes: Axes,
                   shards: int, impl: str) -> tuple[jax.Array, jax.Array]:
    """One device's rows through the experts; returns (y_BTD, kept_BTK). Weights arrive with their hidden size
    split over `tensor_axes` (Megatron-style: gate/up column-split, down row-split), so the output is a partial
    sum over those axes."""
    if capacity > 0:
        out_BTKD, kept_BTK = _capacity_local(x_BTD, ids_BTK, w_gate, w_up, w_down, num_experts=num_experts,
                                             capacity=capacity, expert_axes=expert_axes, shards=shards)
    else:
        out_BTKD = _dropless_local(x_BTD, ids_BTK, w_gate, w_up, w_down, num_experts=num_experts,
                                   expert_axes=expert_axes, shards=shards, impl=impl)
        kept_BTK = jnp.ones(ids_BTK.shape, bool)
    y_BTD = jnp.einsum("btkd,btk->btd", out_BTKD.astype(jnp.float32), weights_BTK).astype(x_BTD.dtype)
    if tensor_axes:
        y_BTD = jax.lax.psum(y_BTD, _axis_name(tensor_axes))
    return y_BTD, kept_BTK


def routed_experts(x_BTD: jax.Array, routing: Routing, w_gate_EDF: jax.Array, w_up_EDF: jax.Array,
                   w_down_EFD: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """The weighted sum of each token's experts, y_BTD, and which assignments were kept (kept_BTK).

    Under a mesh the experts run in `jax.shard_map`: rows stay on their data-parallel device, expert weights are
    split over the `exp` axes (their `embed` dimension is all-gathered on entry, FSDP-style) and the hidden size
    over the `mlp` axes.
    """
    B, T, _ = x_BTD.shape
    local = partial(_experts_local, num_experts=cfg.num_experts, capacity=capacity_per_sequence(cfg, T),
                    impl=grouped_matmul_impl(cfg))
    layout = ExpertLayout.current(B)
    args = (x_BTD, routing.expert_ids_BTK, routing.weights_BTK, w_gate_EDF, w_up_EDF, w_down_EFD)
    if layout is None:
        return local(*args, expert_axes=(), tensor_axes=(), shards=1)
    rows = P(_spec(layout.batch), None, None)
    e, f = _spec(layout.expert), _spec(layout.tensor)
    fn = jax.shard_map(partial(local, expert_axes=layout.expert, tensor_axes=layout.tensor, shards=layout.shards),
                       mesh=layout.mesh, in_specs=(rows, rows, rows, P(e, None, f), P(e, None, f), P(e, f, None)),
                       out_specs=(rows, rows), check_vma=False)  # the tiled loops' zero carries are unvarying
    return fn(*args)


# ----------------------------------------------------------------------------------------------------------
# The block


class MoE(nn.Module):
    """Routed SwiGLU experts (plus optional shared experts), a drop-in for the dense `mlp` block.

    Sows, already scaled, `load_balance` and `router_z` into the `aux` collection (the train step adds every `aux`
    leaf to the loss); each is coef * loss / (number of MoE layers), so the totals are coefficient x the mean over
    layers and a coefficient means the same at any depth. Sows the raw per-layer statistics into `moe` for metrics
    and for DeepSeek-V3's bias update (`router_bias_update`).
    """

    cfg: ModelConfig
    lora: LoraSpec | None = None  # adapters: shared experts through `project`, routed ones by `adapted_experts`

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        c = self.cfg
        B, T, D = x_BTD.shape
        E, F = c.num_experts, c.moe_ffn_dim or c.ffn_dim
        dtype, pdt = compute_dtype(c), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(c.init_std)
        # The router is small and every token needs all of it: replicated over experts.
        w_router_DE = param(self, "router", init, (D, E), ("embed", None), pdt)
        bias_E = None
        if c.router_scoring == "sigmoid":
            bias_E = param(self, "router_bias", nn.initializers.zeros, (E,), (None,), jnp.float32)
        w_gate_EDF = param(self, "gate", init, (E, D, F), ("exp", "embed", "mlp"), pdt)
        w_up_EDF = param(self, "up", init, (E, D, F), ("exp", "embed", "mlp"), pdt)
        w_down_EFD = param(self, "down", init, (E, F, D), ("exp", "mlp", "embed"), pdt)

        # Router in float32 (ST-MoE's selective precision: bf16 logits change which expert wins).
        xr_BTD = x_BTD.astype(jnp.float32)
        if c.router_jitter > 0 and self.has_rng("router"):
            xr_BTD = xr_BTD * jax.random.uniform(self.make_rng("router"), xr_BTD.shape, jnp.float32,
                                                 1.0 - c.router_jitter, 1.0 + c.router_jitter)
        logits_BTE = jnp.einsum("btd,de->bte", xr_BTD, w_router_DE.astype(jnp.float32))
        routing = route(logits_BTE, bias_E, c)

        def cast(name: str, w: jax.Array, names: tuple[str, ...]) -> jax.Array:
            # lora.targets expert_gate/up/down: W + s A_e B_e per expert (maxlm.model.lora.adapted_experts)
            return adapted_experts(self, name, w, names, self.lora, dtype) if adapts(self, name) else w.astype(dtype)

        y_BTD, kept_BTK = routed_experts(x_BTD.astype(dtype), routing,
                                         cast("gate", w_gate_EDF, ("exp", "embed", "mlp")),
                                         cast("up", w_up_EDF, ("exp", "embed", "mlp")),
                                         cast("down", w_down_EFD, ("exp", "mlp", "embed")), c)
        y_BTD = constrain(y_BTD, ("act_batch", "act_length", "act_embed"))

        if c.shared_experts:
            y_BTD = y_BTD + swiglu(self, x_BTD.astype(dtype), D, c.shared_experts * F,
                                   ("shared_gate", "shared_up", "shared_down"))

        lb = load_balance_loss(routing.probs_BTE, routing.expert_ids_BTK)
        z = router_z_loss(logits_BTE)
        n_moe = max(c.num_moe_layers, 1)
        self.sow("aux", "load_balance", c.load_balance_coef * lb / n_moe)
        self.sow("aux", "router_z", c.router_z_coef * z / n_moe)
        load_E = expert_counts(routing.expert_ids_BTK, E).astype(jnp.float32) / (B * T * c.experts_per_token)
        self.sow("moe", "stats", {"load_balance": lb, "router_z": z, "load": load_E,
                                  "dropped": 1.0 - jnp.mean(kept_BTK.astype(jnp.float32))})
        return y_BTD.astype(x_BTD.dtype)


# ----------------------------------------------------------------------------------------------------------
# DeepSeek-V3 auxiliary-loss-free balancing: a bias update that is not a gradient step


def uses_router_bias(cfg: ModelConfig) -> bool:
    """Whether the model balances its experts with DeepSeek-V3's selection bias (so the step must update it)."""
    return cfg.ffn == "moe" and cfg.router_scoring == "sigmoid" and cfg.router_bias_rate != 0


def router_bias_update(cfg: ModelConfig, old_params: Any, new_params: Any, stats: dict[str, Any]) -> Any:
    """`new_params` with every MoE layer's `router_bias` set to old + gamma * sign(mean load - load_e).

    DeepSeek-V3 (sec. 2.1.2): after each step, decrease the bias of an overloaded expert by gamma and increase an
    underloaded one's, gamma = `router_bias_rate`. Loads are the per-expert token fractions of the step's batch:
    `stats["moe_load"]` [n_moe_layers, E] from `maxlm.train.losses.moe_stats` (averaged over microbatches). Starting from
    `old_params` undoes whatever the optimizer did to the bias (its gradient is 0, but weight decay is not).
    A no-op for softmax routers or gamma = 0.
    """
    if not uses_router_bias(cfg):
        return new_params
    E = cfg.num_experts
    load_LE = stats["moe_load"]
    updates: dict[tuple[tuple[str, ...], int | None], jax.Array] = {}
    for n, i in enumerate(cfg.moe_layers):
        updates[layer_path(cfg, i)] = cfg.router_bias_rate * jnp.sign(1.0 / E - load_LE[n])

    def get(tree: Any, path: tuple[str, ...]) -> Any:
        for k in path:
            tree = tree[k]
        return tree

    def set_(tree: Any, path: tuple[str, ...], value: Any) -> Any:
        if not path:
            return value
        return {**tree, path[0]: set_(tree[path[0]], path[1:], value)}

    out = new_params
    for (path, r), delta_E in updates.items():
        where = path + ("moe", "router_bias")
        old = get(old_params, where)
        bias = get(out, where)
        bias = old + delta_E if r is None else bias.at[r].set(old[r] + delta_E)
        out = set_(out, where, bias)
    return out
