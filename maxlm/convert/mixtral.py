"""Hugging Face Mixtral (`MixtralForCausalLM`) <-> maxlm's MoE decoder: Llama's table plus the sparse MoE block.

Attention, norms, embeddings and the LM head are Llama's rows (imported from llama.py); every layer's feed-forward
block is a sparse MoE of E SwiGLU experts with top-k softmax routing, renormalised over the k chosen (Jiang et
al. 2024, eq. 1), which is maxlm's `moe` block with `router_scoring: softmax`.

Tensors as written on disk (transformers 5.23 `save_pretrained` writes this per-expert layout, the one of the
published checkpoints; only its in-memory model fuses the experts into `mlp.experts.gate_up_proj` [E, 2F, D] and
`mlp.experts.down_proj` [E, D, F], which never reach a safetensors file). torch Linear weights are [out, in]:

    model.embed_tokens.weight, norms, self_attn.*, lm_head   as in llama.py
    model.layers.{i}.block_sparse_moe.gate.weight            [E, D]   moe.router   [D, E]
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight  [F, D]   moe.gate     [E, D, F]   (expert e: [e])
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight  [F, D]   moe.up       [E, D, F]
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight  [D, F]   moe.down     [E, F, D]

What Mixtral fixes in maxlm (`fixed`; also how to-hf recognises a maxlm config as a Mixtral, so a model Mixtral
cannot express, such as sigmoid routing, shared experts, dense or alternating layers, or scaled expert weights,
matches no architecture and is refused): every layer MoE, softmax routing renormalised over the top k, routed
weights unscaled, no shared experts. The expert dispatch (`capacity_factor`) is not fixed: it decides which
assignments a training step computes, not what the weights mean, so a model trained with a capacity factor still
exports (transformers runs it dropless), and maxlm's default, 0, makes an imported Mixtral dropless as in
transformers.

Sliding-window attention (config.json `sliding_window`, null in the published Mixtrals) applies to every layer,
as `model.sliding_window`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from maxlm.config import ModelConfig
from maxlm.convert import hf_options, llama
from maxlm.convert.llama import LAYER, LLAMA_CONFIG_KEYS, LLAMA_TENSORS, PLAIN_ATTENTION
from maxlm.convert.mapping import Architecture, ConfigKey, Linear, TensorMap

# What MixtralConfig fills in for an absent key where it differs from LlamaConfig (transformers 5.23).
_MIXTRAL_DEFAULTS = {"n_kv_heads": 8, "rope_theta": 1e6, "norm_eps": 1e-5}

MIXTRAL_CONFIG_KEYS = tuple(
    dataclasses.replace(k, default=_MIXTRAL_DEFAULTS[k.field]) if k.field in _MIXTRAL_DEFAULTS else k
    for k in LLAMA_CONFIG_KEYS
) + (
    ConfigKey("num_local_experts", "num_experts"),
    ConfigKey("num_experts_per_tok", "experts_per_token"),
    # Llama's keys already map intermediate_size -> ffn_dim; the experts' width is the same number.
    ConfigKey("intermediate_size", "moe_ffn_dim"),
    ConfigKey("router_aux_loss_coef", "load_balance_coef", 0.001, training_only=True),
    ConfigKey("router_jitter_noise", "router_jitter", 0.0, training_only=True),
)

_MOE = LAYER + "block_sparse_moe."
MIXTRAL_TENSORS = tuple(t for t in LLAMA_TENSORS if t.maxlm[0] != "mlp") + (
    TensorMap(("moe", "router"), _MOE + "gate.weight", Linear(1)),
    TensorMap(("moe", "gate"), _MOE + "experts.{e}.w1.weight", Linear(1)),
    TensorMap(("moe", "up"), _MOE + "experts.{e}.w3.weight", Linear(1)),
    TensorMap(("moe", "down"), _MOE + "experts.{e}.w2.weight", Linear(1)),
)

MIXTRAL_FIXED: dict[str, Any] = {"ffn": "moe", "router_scoring": "softmax", "router_renormalize": True,
                                 "router_scale": 1.0, "shared_experts": 0, "first_dense_layers": 0,
                                 "moe_layer_interval": 1} | PLAIN_ATTENTION


def check(hf: dict[str, Any]) -> None:
    """One line naming every feature of a (normalised) Mixtral config.json that maxlm cannot represent."""
    llama.refuse("Mixtral", llama.common_problems(hf))


def derive(hf: dict[str, Any]) -> dict[str, Any]:
    return hf_options.rope_fields(hf) | hf_options.window_all_layers(hf, absent=None)


_LLAMA_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp")  # not MixtralConfig fields


def extra_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    out = {k: v for k, v in llama.extra_hf_config(cfg).items() if k not in _LLAMA_ONLY_KEYS}
    # Written after the mapped keys, so this wins over ffn_dim / moe_ffn_dim: the experts' effective width
    # (moe_ffn_dim 0 means ffn_dim), which for an all-MoE model is the only feed-forward width there is.
    out["intermediate_size"] = cfg.moe_ffn_dim or cfg.ffn_dim
    return out | {"sliding_window": cfg.sliding_window or None, "output_router_logits": False}


MIXTRAL = Architecture(model_type="mixtral", hf_class="MixtralForCausalLM", config_keys=MIXTRAL_CONFIG_KEYS,
                       tensors=MIXTRAL_TENSORS, fixed=MIXTRAL_FIXED, check=check, normalize=hf_options.normalize,
                       derive=derive, extra_hf_config=extra_hf_config)
