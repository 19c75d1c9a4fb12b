"""config.json options that several Hugging Face families share: RoPE (theta and scaling) and the sliding window.

Each concern has three parts used by the family tables: `*_problems` (what maxlm cannot represent, one phrase each,
so a family's `check` names everything in one line), `*_fields` (config.json -> ModelConfig fields, after the
check) and `*_hf` (ModelConfig -> config.json keys, the inverse). Semantics are transformers 5.x's:
`PreTrainedConfig.standardize_rope_params` (modeling_rope_utils.py) for RoPE, the families' `__post_init__` and
attention modules for the window.
"""

from __future__ import annotations

from typing import Any

from maxlm.config import ModelConfig
from maxlm.config.model_checks import ALL_ROPE_PARAMS, ROPE_PARAMS

# Hugging Face rope_type -> model.rope_scaling
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}
# model.rope_* field -> key inside Hugging Face's rope_parameters (rope_scaling in transformers 4.x)
ROPE_KEYS = {"rope_factor": "factor", "rope_original_max_positions": "original_max_position_embeddings",
             "rope_low_freq_factor": "low_freq_factor", "rope_high_freq_factor": "high_freq_factor",
             "rope_beta_fast": "beta_fast", "rope_beta_slow": "beta_slow", "rope_truncate": "truncate",
             "rope_mscale": "mscale", "rope_mscale_all_dim": "mscale_all_dim",
             "rope_attention_factor": "attention_factor"}
_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "yarn": ()}


def normalize(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in `rope_parameters` (theta included); 4.x wrote `rope_theta` at the top
    and the scaling in `rope_scaling` (type under `type` or `rope_type`). Adds flat `rope_theta`, `rope_type` and
    `rope` (the scaling parameters) to a copy of config.json."""
    out = dict(hf)
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in rope.values()):  # per-layer-type RoPE (Gemma 3 style)
        out["rope_type"] = "per-layer-type " + "/".join(rope)
        return out
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    out["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    out["rope"] = rope
    return out


def _original_max_positions(hf: dict[str, Any]) -> Any:
    # As standardize_rope_params: a top-level original_max_position_embeddings (Phi-3 style) wins, then the one in
    # the RoPE parameters, then max_position_embeddings.
    return (hf.get("original_max_position_embeddings") or (hf.get("rope") or {}).get(
        "original_max_position_embeddings") or hf.get("max_position_embeddings"))


def rope_problems(hf: dict[str, Any]) -> list[str]:
    kind = hf.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        return [f"RoPE scaling {kind!r} (maxlm implements {', '.join(t for t in ROPE_TYPES if t != 'default')})"]
    problems = []
    rope = hf.get("rope") or {}
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={partial} (maxlm rotates the whole head)")
    missing = [k for k in _REQUIRED.get(kind, ()) if rope.get(k) is None]
    if missing:
        problems.append(f"RoPE scaling {kind!r} without {', '.join(missing)}")
    if kind in ("llama3", "yarn") and not _original_max_positions(hf):
        problems.append(f"RoPE scaling {kind!r} without original_max_position_embeddings")
    if kind == "yarn" and rope.get("factor") is None and not hf.get("max_position_embeddings"):
        problems.append("RoPE scaling 'yarn' without factor or max_position_embeddings")
    return problems


def rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Every `model.rope_*` field (those the type does not read at maxlm's defaults), after `rope_problems`."""
    default = ModelConfig()
    kind = ROPE_TYPES[hf.get("rope_type", "default")]
    out: dict[str, Any] = {name: getattr(default, name) for name in ALL_ROPE_PARAMS} | {"rope_scaling": kind}
    rope = hf.get("rope") or {}
    if kind == "none":
        return out
    out["rope_factor"] = float(rope["factor"]) if rope.get("factor") is not None else None
    if kind == "linear":
        return out
    out["rope_original_max_positions"] = int(_original_max_positions(hf))
    if kind == "llama3":
        out["rope_low_freq_factor"] = float(rope["low_freq_factor"])
        out["rope_high_freq_factor"] = float(rope["high_freq_factor"])
        return out
    if out["rope_factor"] is None:  # transformers: max_position_embeddings / original_max_position_embeddings
        out["rope_factor"] = hf["max_position_embeddings"] / out["rope_original_max_positions"]
    # transformers reads `beta_fast or 32`, `beta_slow or 1` and mscale / attention_factor only when truthy.
    out["rope_beta_fast"] = float(rope.get("beta_fast") or default.rope_beta_fast)
    out["rope_beta_slow"] = float(rope.get("beta_slow") or default.rope_beta_slow)
    out["rope_truncate"] = bool(rope.get("truncate", True))
    for name in ("rope_mscale", "rope_mscale_all_dim", "rope_attention_factor"):
        out[name] = float(rope.get(ROPE_KEYS[name]) or 0.0)
    return out


def rope_hf(cfg: ModelConfig) -> dict[str, Any]:
    """`rope_parameters` (transformers 5; its `rope_theta` also at the top level for 4.x readers)."""
    params: dict[str, Any] = {"rope_theta": cfg.rope_theta,
                              "rope_type": {v: k for k, v in ROPE_TYPES.items()}[cfg.rope_scaling]}
    for name in ROPE_PARAMS[cfg.rope_scaling]:
        value = getattr(cfg, name)
        if name in ("rope_mscale", "rope_mscale_all_dim", "rope_attention_factor") and not value:
            continue  # 0 means "derived" in maxlm; transformers reads an absent key the same way
        params[ROPE_KEYS[name]] = value
    return {"rope_theta": cfg.rope_theta, "rope_parameters": params}


def rope_context(cfg: ModelConfig, seq_len: int) -> int:
    """max_position_embeddings to write: the training length, or the scaled context when RoPE scaling says more
    (transformers warns when original_max_position_embeddings is not below it)."""
    if cfg.rope_scaling in ("llama3", "yarn"):
        return max(seq_len, int(cfg.rope_original_max_positions * cfg.rope_factor))
    return seq_len


# ---- sliding window ----


def window_all_layers(hf: dict[str, Any], absent: int | None) -> dict[str, Any]:
    """Mistral / Mixtral / Qwen3-MoE style: one `sliding_window` (null: none) for every layer; `absent` is what the
    config class assumes when the key is missing (MistralConfig: 4096)."""
    window = hf["sliding_window"] if "sliding_window" in hf else absent
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        window = None  # Qwen: the window exists only with use_sliding_window
    return {"sliding_window": int(window or 0)}


def _qwen_layer_types(hf: dict[str, Any]) -> list[str]:
    """Qwen2/Qwen3 `layer_types`: saved by transformers 5, else from max_window_layers (sliding from that layer on)."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    first = hf.get("max_window_layers", 28)
    return ["sliding_attention" if i >= first else "full_attention" for i in range(hf["num_hidden_layers"])]


def qwen_window_problems(hf: dict[str, Any]) -> list[str]:
    if not (hf.get("use_sliding_window") and hf.get("sliding_window")):
        return []
    kinds = _qwen_layer_types(hf)
    sliding = [i for i, k in enumerate(kinds) if k == "sliding_attention"]
    if len(sliding) != len(kinds):
        return [f"sliding_window={hf['sliding_window']} on {len(sliding)} of {len(kinds)} layers (max_window_layers="
                f"{hf.get('max_window_layers')}); maxlm's window applies to every layer"]
    return []


def qwen_window_fields(hf: dict[str, Any]) -> dict[str, Any]:
    on = hf.get("use_sliding_window") and hf.get("sliding_window")
    every = on and all(k == "sliding_attention" for k in _qwen_layer_types(hf))
    return {"sliding_window": int(hf["sliding_window"]) if every else 0}


def qwen_window_hf(cfg: ModelConfig) -> dict[str, Any]:
    w = cfg.sliding_window
    kind = "sliding_attention" if w else "full_attention"
    return {"use_sliding_window": w > 0, "sliding_window": w or None, "max_window_layers": 0 if w else cfg.n_layers,
            "layer_types": [kind] * cfg.n_layers}
