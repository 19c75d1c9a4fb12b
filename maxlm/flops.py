"""The one place that counts parameters and FLOPs, and the one hardware table.

Used by the model tests (analytic count == `jax.eval_shape` count), the MFU metric, `maxlm bench` and the planner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from maxlm.config import ModelConfig


@dataclass(frozen=True)
class Hardware:
    """Dense bf16 peak per chip (FLOP/s, no sparsity) and HBM per chip (bytes), from the vendors' spec sheets."""

    name: str
    peak_flops: float
    hbm_bytes: float


GB = 1e9
HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in [
        Hardware("tpu-v4", 275e12, 32 * GB),
        Hardware("tpu-v5e", 197e12, 16 * GB),
        Hardware("tpu-v5p", 459e12, 95 * GB),
        Hardware("tpu-v6e", 918e12, 32 * GB),
        Hardware("a100", 312e12, 80 * GB),
        Hardware("h100", 989e12, 80 * GB),
        Hardware("h200", 989e12, 141 * GB),
        Hardware("b200", 2250e12, 180 * GB),
    ]
}


def detect_hardware(device_kind: str) -> Hardware | None:
    """Maps `jax.Device.device_kind` (e.g. 'TPU v5 lite', 'NVIDIA H100 80GB HBM3') to the table; None on CPU."""
    k = device_kind.lower()
    if "tpu" in k:
        if "v6" in k:
            return HARDWARE["tpu-v6e"]
        if "v5" in k:
            return HARDWARE["tpu-v5e"] if ("lite" in k or "v5e" in k) else HARDWARE["tpu-v5p"]
        if "v4" in k:
            return HARDWARE["tpu-v4"]
    for name in ("b200", "h200", "h100", "a100"):
        if name in k:
            return HARDWARE[name]
    return None


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts split the way FLOP and memory estimates need them."""

    total: int
    embedding: int  # the input embedding table (a gather: no matmul FLOPs)
    lm_head: int  # 0 when tied to the embedding
    per_layer: int
    active: int  # parameters touched per token (== total for dense models)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def attention_params(m: ModelConfig) -> int:
    hd = m.head_dim or m.d_model // m.n_heads
    return m.d_model * hd * (2 * m.n_heads + 2 * m.n_kv_heads)  # q, o: H heads; k, v: K heads


def mlp_params(d_model: int, ffn_dim: int) -> int:
    return 3 * d_model * ffn_dim  # SwiGLU: gate, up, down


def count_params(m: ModelConfig) -> ParamCount:
    """Exact parameter count of the decoder maxlm builds from `m` (tested against `jax.eval_shape`)."""
    embedding = m.vocab_size * m.d_model
    lm_head = 0 if m.tie_embeddings else m.vocab_size * m.d_model
    per_layer = attention_params(m) + mlp_params(m.d_model, m.ffn_dim) + 2 * m.d_model  # + two RMSNorm scales
    total = embedding + lm_head + m.n_layers * per_layer + m.d_model  # + final norm
    return ParamCount(total=total, embedding=embedding, lm_head=lm_head, per_layer=per_layer, active=total)


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention.

    6 * N_matmul for the weight matmuls (2 forward, 4 backward), where N_matmul counts the parameters used in
    matmuls for one token: every layer weight plus the LM head (the tied embedding counts once, as the head; the
    input lookup is a gather). Plus 12 * L * H * hd * T for the attention scores and weighted values
    (QK^T and AV, 2 FLOPs per multiply-add, x3 for backward), not halved for the causal mask, as in PaLM/MaxText.
    Norm scales are negligible and left out.
    """
    pc = count_params(m)
    hd = m.head_dim or m.d_model // m.n_heads
    layer_matmul = pc.per_layer - 2 * m.d_model
    n_matmul = m.n_layers * layer_matmul + m.vocab_size * m.d_model
    return 6.0 * n_matmul + 12.0 * m.n_layers * m.n_heads * hd * seq_len


def model_summary(m: ModelConfig, seq_len: int) -> dict[str, float]:
    pc = count_params(m)
    return dataclasses.asdict(pc) | {"flops_per_token": flops_per_token(m, seq_len)}


# ----------------------------------------------------------------------------------------------------------
# Mixture-of-Experts counts (used by the planner's `--moe E,K`; the MoE block itself is a later issue).


def moe_layer_params(d_model: int, moe_ffn_dim: int, num_experts: int, experts_per_token: int) -> tuple[int, int]:
    """(total, active) parameters of one routed feed-forward block: a bias-free router d x E plus E SwiGLU experts.

    Every token passes through the router and through `experts_per_token` of the experts (top-k routing, as in
    Switch/Mixtral), so only those experts' weights count as active: this is what FLOPs per token and the scaling
    laws (which are about compute per token) need, while memory needs the total.
    """
    router = d_model * num_experts
    expert = mlp_params(d_model, moe_ffn_dim)
    return router + num_experts * expert, router + experts_per_token * expert


def count_params_moe(m: ModelConfig, num_experts: int, experts_per_token: int, moe_ffn_dim: int = 0) -> ParamCount:
    """Exact counts of the decoder with every layer's MLP replaced by a routed MoE block (`moe_ffn_dim` 0: ffn_dim).

    Same attention, norms, embedding and head as `count_params`; `per_layer` is the total per layer and `active`
    the parameters one token touches.
    """
    ffn = moe_ffn_dim or m.ffn_dim
    moe_total, moe_active = moe_layer_params(m.d_model, ffn, num_experts, experts_per_token)
    attn_norms = attention_params(m) + 2 * m.d_model
    embedding = m.vocab_size * m.d_model
    lm_head = 0 if m.tie_embeddings else m.vocab_size * m.d_model
    outside = embedding + lm_head + m.d_model
    return ParamCount(total=outside + m.n_layers * (attn_norms + moe_total), embedding=embedding, lm_head=lm_head,
                      per_layer=attn_norms + moe_total, active=outside + m.n_layers * (attn_norms + moe_active))


def flops_per_token_moe(m: ModelConfig, seq_len: int, num_experts: int, experts_per_token: int,
                        moe_ffn_dim: int = 0) -> float:
    """`flops_per_token` for the MoE decoder: 6 x the active matmul parameters (router included) + attention."""
    ffn = moe_ffn_dim or m.ffn_dim
    _, moe_active = moe_layer_params(m.d_model, ffn, num_experts, experts_per_token)
    hd = m.head_dim or m.d_model // m.n_heads
    n_matmul = m.n_layers * (attention_params(m) + moe_active) + m.vocab_size * m.d_model
    return 6.0 * n_matmul + 12.0 * m.n_layers * m.n_heads * hd * seq_len
