"""Batch size, peak learning rate and warmup for a planned run.

Batch and learning rate follow the DeepSeek LLM hyperparameter scaling fits (DeepSeek-AI 2024, "DeepSeek LLM:
Scaling Open-Source Language Models with Longtermism", arXiv:2401.02954, Sec. 3.1):

    B_opt = 0.2920 C^0.3271 tokens,     eta_opt = 0.3118 C^-0.1250,

where their C is *not* 6ND: it is M x D with M the non-embedding FLOPs per token of their Sec. 3.2,
M = 72 n_layer d_model^2 + 6 n_layer d_model l_seq (weight matmuls of every layer, forward + backward, plus the
attention scores with the causal half skipped; the vocabulary projection is left out). They fit these with AdamW
(beta1 0.9, beta2 0.95, weight decay 0.1, 2000 warmup steps), the same optimizer maxlm's defaults configure.
"""

from __future__ import annotations

from maxlm.config import ModelConfig
from maxlm.flops import layer_matmul_params


def non_embedding_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """DeepSeek LLM's M (their Sec. 3.2), generalised to GQA, SwiGLU and MoE: 6 x the per-token weight-matmul
    parameters of the layers (MoE: the active ones, by `maxlm.flops`) + 6 L (heads x head_dim) T for the causal
    attention scores and values."""
    hd = m.head_dim_resolved
    return 6.0 * layer_matmul_params(m) + 6.0 * m.n_layers * m.n_heads * hd * seq_len


def deepseek_batch_tokens(c_m: float) -> float:
    """B_opt in tokens (DeepSeek LLM Sec. 3.1), for C = M x D."""
    return 0.2920 * c_m ** 0.3271


def deepseek_lr(c_m: float) -> float:
    """eta_opt (DeepSeek LLM Sec. 3.1), for C = M x D."""
    return 0.3118 * c_m ** -0.1250


# DeepSeek LLM warmed up for 2000 steps; short runs (sweeps, tests) get 5% of their steps instead, so that warmup
# never eats most of a small run.
MAX_WARMUP_STEPS = 2000
WARMUP_FRACTION = 0.05


def warmup_steps(steps: int) -> int:
    return max(1, min(MAX_WARMUP_STEPS, round(WARMUP_FRACTION * steps)))


def batch_rows(batch_tokens: float, seq_len: int, multiple: int) -> int:
    """Rows per step: B_opt / seq_len rounded to a positive multiple of `multiple` (the data-parallel width, so the
    batch divides evenly over every mesh the planner may pick)."""
    rows = batch_tokens / seq_len
    return max(multiple, round(rows / multiple) * multiple)
