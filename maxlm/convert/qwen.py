"""Hugging Face Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`) and Qwen3 (`Qwen3ForCausalLM`) <-> maxlm's dense decoder.

Both are Llama's tensors plus one attention option each:

    Qwen2  model.layers.{i}.self_attn.{q,k,v}_proj.bias   [N*H], [K*H], [K*H]   attn.{q,k,v}_bias  [N|K, H]
           (model.qkv_bias; o_proj has no bias)
    Qwen3  model.layers.{i}.self_attn.{q,k}_norm.weight   [H]                   attn.{q,k}_norm.scale [H]
           (model.qk_norm: RMSNorm over head_dim of every head, after the projection, before RoPE)

Qwen's sliding window exists only with `use_sliding_window: true` and then only on the layers from
`max_window_layers` on (`layer_types`); maxlm's window applies to every layer, so a window on some layers only is
refused. Published Qwen2.5/Qwen3 checkpoints have it off. Qwen2.5's long-context variants use `rope_type: yarn`.
Qwen3's `attention_bias: true` would put biases on q, k, v and o; maxlm has no o bias, so it is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from maxlm.config import ModelConfig
from maxlm.convert import hf_options, llama
from maxlm.convert.llama import ATTN, LLAMA_CONFIG_KEYS, LLAMA_TENSORS
from maxlm.convert.mapping import Architecture, ConfigKey, Flatten, TensorMap


def qwen_keys(defaults: dict[str, Any]) -> tuple[ConfigKey, ...]:
    """Llama's config keys with a Qwen config class's defaults for absent keys (transformers 5.24)."""
    return tuple(dataclasses.replace(k, default=defaults[k.field]) if k.field in defaults else k
                 for k in LLAMA_CONFIG_KEYS)


QWEN2_BIASES = (
    TensorMap(("attn", "q_bias"), ATTN + "q_proj.bias", Flatten()),
    TensorMap(("attn", "k_bias"), ATTN + "k_proj.bias", Flatten()),
    TensorMap(("attn", "v_bias"), ATTN + "v_proj.bias", Flatten()),
)
QK_NORMS = (
    TensorMap(("attn", "q_norm", "scale"), ATTN + "q_norm.weight"),
    TensorMap(("attn", "k_norm", "scale"), ATTN + "k_norm.weight"),
)


def _check_qwen2(hf: dict[str, Any]) -> None:
    llama.refuse("Qwen2", llama.common_problems(hf) + hf_options.qwen_window_problems(hf))


def _check_qwen3(hf: dict[str, Any]) -> None:
    problems = llama.common_problems(hf) + hf_options.qwen_window_problems(hf)
    if hf.get("attention_bias"):
        problems.append("attention_bias=true (biases on q, k, v and o; maxlm has none on o)")
    llama.refuse("Qwen3", problems)


def _derive(hf: dict[str, Any]) -> dict[str, Any]:
    return hf_options.rope_fields(hf) | hf_options.qwen_window_fields(hf)


def _extra_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": cfg.init_std} | (
        hf_options.rope_hf(cfg) | hf_options.qwen_window_hf(cfg))


QWEN2 = Architecture(
    model_type="qwen2", hf_class="Qwen2ForCausalLM",
    config_keys=qwen_keys({"n_kv_heads": 32}), tensors=LLAMA_TENSORS + QWEN2_BIASES,
    fixed={"ffn": "mlp", "qkv_bias": True, "qk_norm": False}, check=_check_qwen2, normalize=hf_options.normalize,
    derive=_derive, extra_hf_config=_extra_hf_config)

QWEN3 = Architecture(
    model_type="qwen3", hf_class="Qwen3ForCausalLM",
    config_keys=qwen_keys({"n_kv_heads": 32, "head_dim": 128}), tensors=LLAMA_TENSORS + QK_NORMS,
    fixed={"ffn": "mlp", "qkv_bias": False, "qk_norm": True}, check=_check_qwen3, normalize=hf_options.normalize,
    derive=_derive, extra_hf_config=lambda cfg: _extra_hf_config(cfg) | {"attention_bias": False})
