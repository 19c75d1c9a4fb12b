"""Checks of the attention options of `model:` (RoPE scaling, QKV biases, QK-norm, sliding window).

Called from `maxlm.config.checks.check_static`, so every mistake is one line naming the key before anything
compiles. Imports nothing outside maxlm.config.
"""

from __future__ import annotations

from maxlm.config.schema import ConfigError, ModelConfig

ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")

# Which `rope_*` parameters each scaling type reads (transformers' modeling_rope_utils.py init functions).
ROPE_PARAMS: dict[str, tuple[str, ...]] = {
    "none": (),
    "linear": ("rope_factor",),
    "llama3": ("rope_factor", "rope_original_max_positions", "rope_low_freq_factor", "rope_high_freq_factor"),
    "yarn": ("rope_factor", "rope_original_max_positions", "rope_beta_fast", "rope_beta_slow", "rope_truncate",
             "rope_mscale", "rope_mscale_all_dim", "rope_attention_factor"),
}
ALL_ROPE_PARAMS = tuple(dict.fromkeys(p for ps in ROPE_PARAMS.values() for p in ps))


def check_model_options(m: ModelConfig) -> None:
    """Ranges of the RoPE scaling parameters, and no parameter set that the chosen scaling would ignore."""
    if m.rope_scaling not in ROPE_SCALINGS:
        raise ConfigError(f"model.rope_scaling={m.rope_scaling!r} is not one of {', '.join(ROPE_SCALINGS)}")
    if m.rope_theta <= 0:
        raise ConfigError(f"model.rope_theta must be positive, got {m.rope_theta}")
    default = ModelConfig()
    used = ROPE_PARAMS[m.rope_scaling]
    for name in ALL_ROPE_PARAMS:
        if name not in used and getattr(m, name) != getattr(default, name):
            readers = [t for t, ps in ROPE_PARAMS.items() if name in ps]
            raise ConfigError(f"model.{name}={getattr(m, name)!r} is ignored by model.rope_scaling={m.rope_scaling}; "
                              f"it is read by {' or '.join(readers)} (or leave it at {getattr(default, name)!r})")
    if m.rope_scaling != "none" and not m.rope_factor >= 1:
        raise ConfigError(f"model.rope_factor must be >= 1 for model.rope_scaling={m.rope_scaling}, got "
                          f"{m.rope_factor}")
    if m.rope_scaling in ("llama3", "yarn") and m.rope_original_max_positions <= 0:
        raise ConfigError(f"model.rope_scaling={m.rope_scaling} needs model.rope_original_max_positions (the "
                          f"pretraining context length, e.g. 8192 for Llama 3.1), got {m.rope_original_max_positions}")
    if m.rope_scaling == "llama3" and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
        raise ConfigError(f"model.rope_low_freq_factor={m.rope_low_freq_factor} and model.rope_high_freq_factor="
                          f"{m.rope_high_freq_factor} need 0 < low < high (Llama 3.1: 1 and 4)")
    if m.rope_scaling == "yarn":
        if not 0 < m.rope_beta_slow < m.rope_beta_fast:
            raise ConfigError(f"model.rope_beta_slow={m.rope_beta_slow} and model.rope_beta_fast={m.rope_beta_fast} "
                              f"need 0 < beta_slow < beta_fast (YaRN: 1 and 32)")
        for name in ("rope_mscale", "rope_mscale_all_dim", "rope_attention_factor"):
            if getattr(m, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0 (0: unused), got {getattr(m, name)}")
    if m.sliding_window < 0:
        raise ConfigError(f"model.sliding_window must be >= 0 (0: full causal attention), got {m.sliding_window}")

