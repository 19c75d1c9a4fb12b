"""The one place that counts parameters and FLOPs, and the one hardware table.

Used by the model tests (analytic count == `jax.eval_shape` count), the MFU metric, `maxlm bench` and the planner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from maxlm.config import ModelConfig


@dataclass(frozen=True)
class Hardware:
    """Dense bf16 peak per chip (FLOP/s, no sparsity), HBM per chip (bytes) and HBM bandwidth per chip (bytes/s,
    what bounds decoding), from the vendors' spec sheets."""

    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float = 0.0


GB = 1e9
HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in [
        Hardware("tpu-v4", 275e12, 32 * GB, 1.2e12),
        Hardware("tpu-v5e", 197e12, 16 * GB, 819e9),
        Hardware("tpu-v5p", 459e12, 95 * GB, 2.765e12),
        Hardware("tpu-v6e", 918e12, 32 * GB, 1.64e12),
        Hardware("a100", 312e12, 80 * GB, 2.039e12),
        Hardware("h100", 989e12, 80 * GB, 3.35e12),
        Hardware("h200", 989e12, 141 * GB, 4.8e12),
        Hardware("b200", 2250e12, 180 * GB, 8e12),
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
    hd = m.head_dim_resolved
    return m.d_model * hd * (2 * m.n_heads + 2 * m.n_kv_heads)  # q, o: H heads; k, v: K heads


def attention_vector_params(m: ModelConfig) -> int:
    """Attention parameters outside its matmuls: q/k/v biases (`qkv_bias`) and the two [head_dim] QK-norm scales."""
    hd = m.head_dim_resolved
    return (hd * (m.n_heads + 2 * m.n_kv_heads) if m.qkv_bias else 0) + (2 * hd if m.qk_norm else 0)


def mlp_params(d_model: int, ffn_dim: int) -> int:
    return 3 * d_model * ffn_dim  # SwiGLU: gate, up, down


def moe_params(m: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of one MoE block: the bias-free router D x E (+ the E selection biases of sigmoid
    routing), E routed SwiGLU experts and the shared experts.

    Every token passes through the router, the shared experts and `experts_per_token` routed experts (top-k, as in
    Switch/Mixtral), so only those count as active: FLOPs per token and the scaling laws (about compute per token)
    need the active count, memory the total.
    """
    f = m.moe_ffn_dim or m.ffn_dim
    router = m.d_model * m.num_experts + (m.num_experts if m.router_scoring == "sigmoid" else 0)
    expert = mlp_params(m.d_model, f)
    shared = mlp_params(m.d_model, m.shared_experts * f)
    return router + shared + m.num_experts * expert, router + shared + m.experts_per_token * expert


def _ffn_matmul_active(m: ModelConfig) -> tuple[int, int]:
    """Per-token matmul parameters of a dense layer's and of an MoE layer's feed-forward block (router included,
    the selection bias left out: an add, not a matmul)."""
    moe_active = moe_params(m)[1] - (m.num_experts if m.router_scoring == "sigmoid" else 0)
    return mlp_params(m.d_model, m.ffn_dim), moe_active


def count_params(m: ModelConfig) -> ParamCount:
    """Exact parameter count of the decoder maxlm builds from `m` (tested against `jax.eval_shape`), dense or MoE.

    Which layers are MoE is `ModelConfig.layer_is_moe` (here in closed form, `num_moe_layers`). `per_layer` is the
    largest layer (an MoE layer in a mixed stack): what one layer's working copy of weights costs.
    """
    embedding = m.vocab_size * m.d_model
    lm_head = 0 if m.tie_embeddings else m.vocab_size * m.d_model
    attn_norms = attention_params(m) + attention_vector_params(m) + 2 * m.d_model  # + two RMSNorm scales
    n_moe = m.num_moe_layers
    n_dense = m.n_layers - n_moe
    dense_layer = attn_norms + mlp_params(m.d_model, m.ffn_dim)
    moe_total, moe_active = moe_params(m) if n_moe else (0, 0)
    outside = embedding + lm_head + m.d_model  # + final norm
    total = outside + n_dense * dense_layer + n_moe * (attn_norms + moe_total)
    active = outside + n_dense * dense_layer + n_moe * (attn_norms + moe_active)
    per_layer = max(dense_layer if n_dense else 0, attn_norms + moe_total if n_moe else 0)
    return ParamCount(total=total, embedding=embedding, lm_head=lm_head, per_layer=per_layer, active=active)


def layer_matmul_params(m: ModelConfig) -> int:
    """Matmul parameters one token uses in all layers together (attention + active feed-forward, no norms)."""
    dense_ffn, moe_ffn = _ffn_matmul_active(m)
    n_moe = m.num_moe_layers
    return m.n_layers * attention_params(m) + (m.n_layers - n_moe) * dense_ffn + n_moe * moe_ffn


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention.

    6 * N_matmul for the weight matmuls (2 forward, 4 backward), where N_matmul counts the parameters used in
    matmuls for one token: every layer weight plus the LM head (the tied embedding counts once, as the head; the
    input lookup is a gather). For MoE layers only the active experts count (k routed + shared + the router):
    MFU of an MoE model is measured against the compute a token actually needs. Plus 12 * L * H * hd * T for the
    attention scores and weighted values (QK^T and AV, 2 FLOPs per multiply-add, x3 for backward), not halved for
    the causal mask, as in PaLM/MaxText; with a sliding window a query sees at most `sliding_window` keys, so T
    becomes min(T, window). Norm scales and biases are negligible and left out.
    """
    hd = m.head_dim_resolved
    n_matmul = layer_matmul_params(m) + m.vocab_size * m.d_model
    keys = min(seq_len, m.sliding_window) if m.sliding_window > 0 else seq_len
    return 6.0 * n_matmul + 12.0 * m.n_layers * m.n_heads * hd * keys


def model_summary(m: ModelConfig, seq_len: int) -> dict[str, float]:
    pc = count_params(m)
    return dataclasses.asdict(pc) | {"flops_per_token": flops_per_token(m, seq_len)}
