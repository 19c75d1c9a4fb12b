"""Hugging Face Llama (`LlamaForCausalLM`) <-> maxlm's dense decoder: the whole architecture as a table.

Tensors (transformers 5 names; torch Linear weights are [out, in]):

    model.embed_tokens.weight                       [V, D]      embed.embedding            [V, D]
    model.layers.{i}.input_layernorm.weight         [D]         attn_norm.scale            [D]
    model.layers.{i}.self_attn.q_proj.weight        [N*H, D]    attn.q                     [D, N, H]
    model.layers.{i}.self_attn.k_proj.weight        [K*H, D]    attn.k                     [D, K, H]
    model.layers.{i}.self_attn.v_proj.weight        [K*H, D]    attn.v                     [D, K, H]
    model.layers.{i}.self_attn.o_proj.weight        [D, N*H]    attn.o                     [N, H, D]
    model.layers.{i}.post_attention_layernorm.weight [D]        ffn_norm.scale             [D]
    model.layers.{i}.mlp.gate_proj.weight           [F, D]      mlp.gate                   [D, F]
    model.layers.{i}.mlp.up_proj.weight             [F, D]      mlp.up                     [D, F]
    model.layers.{i}.mlp.down_proj.weight           [D, F]      mlp.down                   [F, D]
    model.norm.weight                               [D]         final_norm.scale           [D]
    lm_head.weight (absent when tied)               [V, D]      lm_head                    [D, V]
"""

from __future__ import annotations

from typing import Any

from maxlm.config import ConfigError, ModelConfig
from maxlm.convert.mapping import Architecture, ConfigKey, Linear, TensorMap


def normalize(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in `rope_parameters`; 4.x wrote `rope_theta` / `rope_scaling`."""
    out = dict(hf)
    rope = hf.get("rope_parameters") or {}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    scaling = hf.get("rope_scaling") or rope
    out["rope_type"] = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    return out


def check(hf: dict[str, Any]) -> None:
    problems = []
    if hf.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling {hf['rope_type']!r} (maxlm implements plain RoPE with a theta)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true (maxlm's projections have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (maxlm's MLP is SwiGLU)")
    if problems:
        raise ConfigError("this Llama config uses what maxlm cannot represent: " + "; ".join(problems))


def extra_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "pretraining_tp": 1, "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
            "rope_theta": cfg.rope_theta, "initializer_range": cfg.init_std}


LLAMA_CONFIG_KEYS = (
    ConfigKey("vocab_size", "vocab_size"),
    ConfigKey("hidden_size", "d_model"),
    ConfigKey("num_hidden_layers", "n_layers"),
    ConfigKey("num_attention_heads", "n_heads"),
    ConfigKey("num_key_value_heads", "n_kv_heads", lambda hf: hf["num_attention_heads"]),
    ConfigKey("head_dim", "head_dim", lambda hf: hf["hidden_size"] // hf["num_attention_heads"]),
    ConfigKey("intermediate_size", "ffn_dim"),
    ConfigKey("rope_theta", "rope_theta", 10000.0),
    ConfigKey("rms_norm_eps", "norm_eps", 1e-6),
    ConfigKey("tie_word_embeddings", "tie_embeddings", False),
)

LAYER = "model.layers.{i}."
LLAMA_TENSORS = (
    TensorMap(("embed", "embedding"), "model.embed_tokens.weight", per_layer=False),
    TensorMap(("final_norm", "scale"), "model.norm.weight", per_layer=False),
    TensorMap(("lm_head",), "lm_head.weight", Linear(1), per_layer=False, when=lambda cfg: not cfg.tie_embeddings),
    TensorMap(("attn_norm", "scale"), LAYER + "input_layernorm.weight"),
    TensorMap(("attn", "q"), LAYER + "self_attn.q_proj.weight", Linear(1)),
    TensorMap(("attn", "k"), LAYER + "self_attn.k_proj.weight", Linear(1)),
    TensorMap(("attn", "v"), LAYER + "self_attn.v_proj.weight", Linear(1)),
    TensorMap(("attn", "o"), LAYER + "self_attn.o_proj.weight", Linear(2)),
    TensorMap(("ffn_norm", "scale"), LAYER + "post_attention_layernorm.weight"),
    TensorMap(("mlp", "gate"), LAYER + "mlp.gate_proj.weight", Linear(1)),
    TensorMap(("mlp", "up"), LAYER + "mlp.up_proj.weight", Linear(1)),
    TensorMap(("mlp", "down"), LAYER + "mlp.down_proj.weight", Linear(1)),
)

LLAMA = Architecture(model_type="llama", hf_class="LlamaForCausalLM", config_keys=LLAMA_CONFIG_KEYS,
                     tensors=LLAMA_TENSORS, fixed={"ffn": "mlp"}, check=check, normalize=normalize,
                     extra_hf_config=extra_hf_config)
