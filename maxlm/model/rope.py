"""Rotary position embedding (Su et al. 2021) and its long-context frequency scalings.

`rope_frequencies(cfg)` returns the H/2 inverse frequencies and the cos/sin scale (`attention_factor`) exactly as
transformers' RoPE initialisation functions compute them (transformers/modeling_rope_utils.py:
`_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`,
`_compute_yarn_parameters`), so an imported Llama 3.1 / Qwen2.5-1M / DeepSeek checkpoint sees the angles it was
trained with. The frequencies depend only on the config: they are numpy constants computed at trace time (in
float64, then rounded once to float32), never traced arrays.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (Peng et al. 2023, eq. 22: sqrt(1/t) = 0.1 ln(s) + 1), DeepSeek's mscale form."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq_K: np.ndarray, cfg: ModelConfig, dim: int) -> tuple[np.ndarray, float]:
    """YaRN "NTK-by-parts" (Peng et al. 2023, sec. 3.2): frequencies that turn more than beta_fast times over the
    original context are kept, those under beta_slow are divided by the factor, a linear ramp between."""
    base, factor, orig = cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_positions
    if cfg.rope_attention_factor:
        attention_factor = cfg.rope_attention_factor
    elif cfg.rope_mscale and cfg.rope_mscale_all_dim:
        attention_factor = _yarn_mscale(factor, cfg.rope_mscale) / _yarn_mscale(factor, cfg.rope_mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times in the original context.
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoids dividing by zero
    ramp_K = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep_K = 1.0 - ramp_K  # 1: extrapolate (keep the frequency), 0: interpolate (divide by the factor)
    return inv_freq_K / factor * (1.0 - keep_K) + inv_freq_K * keep_K, attention_factor


def _llama3(inv_freq_K: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Llama 3.1 (Grattafiori et al. 2024; Meta's `apply_scaling`): wavelengths longer than orig / low_freq_factor
    are divided by the factor, shorter than orig / high_freq_factor kept, and smoothly interpolated between."""
    factor, orig = cfg.rope_factor, cfg.rope_original_max_positions
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen_K = 2 * math.pi / inv_freq_K
    scaled_K = np.where(wavelen_K > orig / low, inv_freq_K / factor, inv_freq_K)
    smooth_K = (orig / wavelen_K - low) / (high - low)
    smoothed_K = (1 - smooth_K) * scaled_K / factor + smooth_K * scaled_K
    medium_K = ~(wavelen_K < orig / high) & ~(wavelen_K > orig / low)
    return np.where(medium_K, smoothed_K, scaled_K)


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [H/2] float32, attention_factor): pair (x_i, x_{i+H/2}) turns by pos * inv_freq[i] and
    cos/sin are multiplied by attention_factor (1 except for YaRN)."""
    dim = cfg.head_dim_resolved
    inv_freq_K = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    attention_factor = 1.0
    if cfg.rope_scaling == "linear":  # Chen et al. 2023, position interpolation: positions / factor
        inv_freq_K = inv_freq_K / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        inv_freq_K = _llama3(inv_freq_K, cfg)
    elif cfg.rope_scaling == "yarn":
        inv_freq_K, attention_factor = _yarn(inv_freq_K, cfg, dim)
    elif cfg.rope_scaling != "none":
        raise ValueError(f"unknown rope_scaling {cfg.rope_scaling!r}")
    return inv_freq_K.astype(np.float32), float(attention_factor)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotates each head vector by its position, rotate-half layout as in Hugging Face Llama (pair (x_i, x_{i+H/2})).

    Positions come from the batch, so packed documents each start at position 0 and a document's encoding does
    not depend on its neighbours. Computed in float32 like transformers' rotary embedding.
    """
    H = x_BTNH.shape[-1]
    inv_freq, attention_factor = rope_frequencies(cfg)
    angles_BTK = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos_BTK, sin_BTK = jnp.cos(angles_BTK), jnp.sin(angles_BTK)
    if attention_factor != 1.0:  # YaRN: scaling both q and k multiplies the logits by attention_factor^2
        cos_BTK, sin_BTK = cos_BTK * attention_factor, sin_BTK * attention_factor
    cos_BT1K, sin_BT1K = cos_BTK[:, :, None, :], sin_BTK[:, :, None, :]
    x32 = x_BTNH.astype(jnp.float32)
    x1, x2 = x32[..., : H // 2], x32[..., H // 2:]
    out = jnp.concatenate([x1 * cos_BT1K - x2 * sin_BT1K, x2 * cos_BT1K + x1 * sin_BT1K], axis=-1)
    return out.astype(x_BTNH.dtype)
