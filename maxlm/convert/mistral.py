"""Hugging Face Mistral (`MistralForCausalLM`) <-> maxlm: Llama's tensors, plus a sliding window on every layer.

Mistral 7B v0.1 attends to the last `sliding_window` = 4096 tokens (Jiang et al. 2023, sec. 2; transformers'
`sliding_window_overlay`: key index > query index - window), which is `model.sliding_window`; v0.3 sets it to null
(full causal attention). MistralConfig assumes 4096 when the key is absent, and so does this table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from maxlm.config import ModelConfig
from maxlm.convert import hf_options, llama
from maxlm.convert.llama import LLAMA_CONFIG_KEYS, LLAMA_TENSORS, PLAIN_ATTENTION
from maxlm.convert.mapping import Architecture

# What MistralConfig fills in for an absent key where it differs from LlamaConfig (transformers 5.24).
_MISTRAL_DEFAULTS = {"n_kv_heads": 8}
MISTRAL_WINDOW = 4096

MISTRAL_CONFIG_KEYS = tuple(
    dataclasses.replace(k, default=_MISTRAL_DEFAULTS[k.field]) if k.field in _MISTRAL_DEFAULTS else k
    for k in LLAMA_CONFIG_KEYS)


def check(hf: dict[str, Any]) -> None:
    llama.refuse("Mistral", llama.common_problems(hf))


def derive(hf: dict[str, Any]) -> dict[str, Any]:
    return hf_options.rope_fields(hf) | hf_options.window_all_layers(hf, absent=MISTRAL_WINDOW)


def extra_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": cfg.init_std,
            "sliding_window": cfg.sliding_window or None} | hf_options.rope_hf(cfg)


MISTRAL = Architecture(model_type="mistral", hf_class="MistralForCausalLM", config_keys=MISTRAL_CONFIG_KEYS,
                       tensors=LLAMA_TENSORS, fixed={"ffn": "mlp"} | PLAIN_ATTENTION, check=check,
                       normalize=hf_options.normalize, derive=derive, extra_hf_config=extra_hf_config)
