"""Grouped-query self-attention with a causal + document (segment) mask, optionally a sliding window.

The kernel is `jax.nn.dot_product_attention`: `xla` everywhere, `cudnn` (flash attention) on NVIDIA GPUs.
Options (all off by default): q/k/v biases (`model.qkv_bias`, Qwen2), per-head RMSNorm on queries and keys
(`model.qk_norm`, Qwen3), RoPE frequency scaling (`model.rope_scaling`, maxlm/model/rope.py) and a sliding window
(`model.sliding_window`, Mistral).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxlm.config import ModelConfig
from maxlm.model import kv_cache
from maxlm.model.layers import RMSNorm, compute_dtype, constrain, param, project
from maxlm.model.rope import apply_rope
from maxlm.model.lora import LoraSpec


def attention_impl(cfg: ModelConfig, dtype: jnp.dtype) -> str:
    """`auto` picks cuDNN flash attention on GPU for 16-bit compute (its supported case), else XLA."""
    if cfg.attention != "auto":
        return cfg.attention
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else "xla"


def attention_mask(q_segment_ids_BT: jax.Array, kv_segment_ids_BS: jax.Array, q_positions_BT: jax.Array,
                   kv_positions_BS: jax.Array, sliding_window: int) -> jax.Array:
    """[B, 1, T, S] True where query t may see key s, apart from causality (passed to the kernel separately so
    cuDNN can skip the masked half instead of materialising it): the same packed document, and with a sliding
    window w > 0 at most w - 1 positions back (Mistral; transformers' `sliding_window_overlay`: kv > q - w).
    Positions restart at 0 in every document, so within a document their difference is the token distance."""
    mask_BTS = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
    if sliding_window > 0:
        mask_BTS &= q_positions_BT[:, :, None] - kv_positions_BS[:, None, :] < sliding_window
    return mask_BTS[:, None, :, :]


def _bias(module: nn.Module, name: str, shape: tuple[int, int], heads_axis: str, dtype: jnp.dtype) -> jax.Array:
    """A projection bias [heads, head_dim] (Qwen2's q/k/v biases), zero-initialised."""
    return param(module, name, nn.initializers.zeros, shape, (heads_axis, "head_dim"), dtype)


class Attention(nn.Module):
    """GQA (Ainslie et al. 2023): N query heads share K key/value heads, N % K == 0.

    With `cache` (decoding, maxlm/model/kv_cache.py) the new keys/values are written into the layer's buffers at
    their positions, the queries attend over the whole buffer with the cache's causal mask, and the call returns
    (out_BTD, updated cache); without it, out_BTD over the packed batch as in training.
    """

    cfg: ModelConfig
    lora: LoraSpec | None = None  # adapters on the projections it selects (maxlm.model.lora)

    @nn.compact
    def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, positions_BT: jax.Array,
                 cache: kv_cache.LayerKV | None = None) -> jax.Array | tuple[jax.Array, kv_cache.LayerKV]:
        c = self.cfg
        D, N, K = c.d_model, c.n_heads, c.n_kv_heads
        H = c.head_dim_resolved
        dtype = compute_dtype(c)
        pdt = jnp.dtype(c.param_dtype)
        q_BTNH = project(self, "q", x_BTD, "btd,dnh->btnh", (D, N, H), ("embed", "heads", "head_dim"))
        k_BTKH = project(self, "k", x_BTD, "btd,dkh->btkh", (D, K, H), ("embed", "kv_heads", "head_dim"))
        v_BTKH = project(self, "v", x_BTD, "btd,dkh->btkh", (D, K, H), ("embed", "kv_heads", "head_dim"))
        if c.qkv_bias:  # Qwen2: q, k and v have biases, o has none
            q_BTNH = q_BTNH + _bias(self, "q_bias", (N, H), "heads", pdt).astype(dtype)
            k_BTKH = k_BTKH + _bias(self, "k_bias", (K, H), "kv_heads", pdt).astype(dtype)
            v_BTKH = v_BTKH + _bias(self, "v_bias", (K, H), "kv_heads", pdt).astype(dtype)
        if c.qk_norm:  # Qwen3: one RMSNorm scale [H] shared by all heads, applied before RoPE
            q_BTNH = RMSNorm(c, name="q_norm")(q_BTNH)
            k_BTKH = RMSNorm(c, name="k_norm")(k_BTKH)
        q_BTNH = constrain(apply_rope(q_BTNH, positions_BT, c), ("act_batch", "act_length", "act_heads", None))
        k_BTKH = constrain(apply_rope(k_BTKH, positions_BT, c), ("act_batch", "act_length", "act_kv_heads", None))
        v_BTKH = constrain(v_BTKH, ("act_batch", "act_length", "act_kv_heads", None))

        if cache is None:
            mask_B1TS = attention_mask(segment_ids_BT, segment_ids_BT, positions_BT, positions_BT, c.sliding_window)
            out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask_B1TS, is_causal=True,
                                                    implementation=attention_impl(c, dtype))
        else:
            cache = kv_cache.write(cache, k_BTKH, v_BTKH, positions_BT)
            out_BTNH = kv_cache.attend(q_BTNH, cache, positions_BT, c.sliding_window)
        out_BTNH = constrain(out_BTNH, ("act_batch", "act_length", "act_heads", None))
        out_BTD = project(self, "o", out_BTNH, "btnh,nhd->btd", (N, H, D), ("heads", "head_dim", "embed"))
        out_BTD = constrain(out_BTD, ("act_batch", "act_length", "act_embed"))
        return out_BTD if cache is None else (out_BTD, cache)
