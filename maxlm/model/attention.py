"""Grouped-query self-attention with a causal + document (segment) mask.

The kernel is `jax.nn.dot_product_attention`: `xla` everywhere, `cudnn` (flash attention) on NVIDIA GPUs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxlm.config import ModelConfig
from maxlm.model.layers import apply_rope, compute_dtype, constrain, project


def attention_impl(cfg: ModelConfig, dtype: jnp.dtype) -> str:
    """`auto` picks cuDNN flash attention on GPU for 16-bit compute (its supported case), else XLA."""
    if cfg.attention != "auto":
        return cfg.attention
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else "xla"


class Attention(nn.Module):
    """GQA (Ainslie et al. 2023): N query heads share K key/value heads, N % K == 0."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
        c = self.cfg
        D, N, K = c.d_model, c.n_heads, c.n_kv_heads
        H = c.head_dim_resolved
        dtype = compute_dtype(c)
        q_BTNH = project(self, "q", x_BTD, "btd,dnh->btnh", (D, N, H), ("embed", "heads", "head_dim"))
        k_BTKH = project(self, "k", x_BTD, "btd,dkh->btkh", (D, K, H), ("embed", "kv_heads", "head_dim"))
        v_BTKH = project(self, "v", x_BTD, "btd,dkh->btkh", (D, K, H), ("embed", "kv_heads", "head_dim"))
        q_BTNH = constrain(apply_rope(q_BTNH, positions_BT, c.rope_theta), ("act_batch", "act_length", "act_heads", None))
        k_BTKH = constrain(apply_rope(k_BTKH, positions_BT, c.rope_theta), ("act_batch", "act_length", "act_kv_heads", None))
        v_BTKH = constrain(v_BTKH, ("act_batch", "act_length", "act_kv_heads", None))

        # Tokens attend only within their own packed document; the causal part is passed separately so cuDNN
        # can skip the masked half instead of materialising it.
        same_doc_B1TS = (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
        out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=same_doc_B1TS, is_causal=True,
                                                implementation=attention_impl(c, dtype))
        out_BTNH = constrain(out_BTNH, ("act_batch", "act_length", "act_heads", None))
        out_BTD = project(self, "o", out_BTNH, "btnh,nhd->btd", (N, H, D), ("heads", "head_dim", "embed"))
        return constrain(out_BTD, ("act_batch", "act_length", "act_embed"))
