"""Hugging Face Llama (`LlamaForCausalLM`, Llama 2 and 3.x) <-> maxlm's dense decoder: the architecture as a table.

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

RoPE scaling (Llama 3.1-3.3: `rope_type: llama3`; also linear and yarn) maps to `model.rope_scaling` and its
parameters (maxlm/convert/hf_options.py). Llama's `attention_bias` puts a bias on o as well, which maxlm does not
have (its `qkv_bias` is Qwen2's q/k/v-only biases), so it is refused, as are MLP biases and other activations.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from maxlm.config import ConfigError, ModelConfig
from maxlm.convert import hf_options
from maxlm.convert.mapping import Architecture, ConfigKey, Linear, TensorMap

normalize = hf_options.normalize


def common_problems(hf: dict[str, Any]) -> list[str]:
    """What no family table maps: RoPE types other than linear/llama3/yarn, non-SwiGLU activations, MLP biases."""
    problems = hf_options.rope_problems(hf)
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (maxlm's MLP is SwiGLU)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true (maxlm's MLP has no biases)")
    return problems


def refuse(family: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"this {family} config uses what maxlm cannot represent: " + "; ".join(problems))


def check(hf: dict[str, Any]) -> None:
    problems = common_problems(hf)
    if hf.get("attention_bias"):
        problems.append("attention_bias=true (biases on q, k, v and o; maxlm's model.qkv_bias has none on o)")
    refuse("Llama", problems)


def extra_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "pretraining_tp": 1, "initializer_range": cfg.init_std} | hf_options.rope_hf(cfg)


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
ATTN = LAYER + "self_attn."
LLAMA_TENSORS = (
    TensorMap(("embed", "embedding"), "model.embed_tokens.weight", per_layer=False),
    TensorMap(("final_norm", "scale"), "model.norm.weight", per_layer=False),
    TensorMap(("lm_head",), "lm_head.weight", Linear(1), per_layer=False, when=lambda cfg: not cfg.tie_embeddings),
    TensorMap(("attn_norm", "scale"), LAYER + "input_layernorm.weight"),
    TensorMap(("attn", "q"), ATTN + "q_proj.weight", Linear(1)),
    TensorMap(("attn", "k"), ATTN + "k_proj.weight", Linear(1)),
    TensorMap(("attn", "v"), ATTN + "v_proj.weight", Linear(1)),
    TensorMap(("attn", "o"), ATTN + "o_proj.weight", Linear(2)),
    TensorMap(("ffn_norm", "scale"), LAYER + "post_attention_layernorm.weight"),
    TensorMap(("mlp", "gate"), LAYER + "mlp.gate_proj.weight", Linear(1)),
    TensorMap(("mlp", "up"), LAYER + "mlp.up_proj.weight", Linear(1)),
    TensorMap(("mlp", "down"), LAYER + "mlp.down_proj.weight", Linear(1)),
)

# What every dense family without its own options fixes (also how to-hf tells the families apart).
PLAIN_ATTENTION = {"qkv_bias": False, "qk_norm": False}

LLAMA = Architecture(model_type="llama", hf_class="LlamaForCausalLM", config_keys=LLAMA_CONFIG_KEYS,
                     tensors=LLAMA_TENSORS, fixed={"ffn": "mlp", "sliding_window": 0} | PLAIN_ATTENTION, check=check,
                     normalize=normalize, derive=hf_options.rope_fields, extra_hf_config=extra_hf_config)

# A reward model: `LlamaForSequenceClassification` with num_labels=1 is the same backbone without `lm_head`, plus
# `score.weight` [1, D] (no bias) read at the last non-pad token; maxlm's `score.kernel` [D, 1] (model.head=scalar).
LLAMA_REWARD_TENSORS = tuple(t for t in LLAMA_TENSORS if t.maxlm != ("lm_head",)) + (
    TensorMap(("score", "kernel"), "score.weight", Linear(1), per_layer=False),)


def reward_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return extra_hf_config(cfg) | {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                                   "problem_type": "regression"}


LLAMA_REWARD = dataclasses.replace(LLAMA, hf_class="LlamaForSequenceClassification", tensors=LLAMA_REWARD_TENSORS,
                                   fixed=LLAMA.fixed | {"head": "scalar"}, extra_hf_config=reward_hf_config)
