"""Hugging Face Qwen3-MoE (`Qwen3MoeForCausalLM`, e.g. Qwen3-30B-A3B) <-> maxlm's MoE decoder.

Qwen3's attention (with QK-norm, qwen.py) and a sparse MoE block on the layers that `decoder_sparse_step` and
`mlp_only_layers` select (layer i is MoE when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0),
the others a dense SwiGLU of `intermediate_size`. The router is a softmax over E experts, top k, renormalised
over the k only with `norm_topk_prob` (maxlm's `router_renormalize`; Qwen3-30B-A3B: true); the experts are
`moe_intermediate_size` wide (maxlm's `moe_ffn_dim`, decoupled from the dense `ffn_dim`). No shared experts.

    model.layers.{i}.mlp.gate.weight                    [E, D]   moe.router  [D, E]
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight   [F, D]   moe.gate    [E, D, F]   (expert e: [e])
    model.layers.{i}.mlp.experts.{e}.up_proj.weight     [F, D]   moe.up      [E, D, F]
    model.layers.{i}.mlp.experts.{e}.down_proj.weight   [D, F]   moe.down    [E, F, D]
    dense layers: model.layers.{i}.mlp.{gate,up,down}_proj.weight as in llama.py

maxlm expresses which layers are MoE as `first_dense_layers` then every `moe_layer_interval`-th; a Hugging Face
pattern that is not of that form is refused. Export always writes decoder_sparse_step 1 and the dense layers as
`mlp_only_layers`, which expresses every maxlm pattern. The sliding window (`use_sliding_window`) covers every
layer in this family.
"""

from __future__ import annotations

from typing import Any

from maxlm.config import ModelConfig
from maxlm.convert import hf_options, llama
from maxlm.convert.llama import LAYER, LLAMA_TENSORS
from maxlm.convert.mapping import Architecture, ConfigKey, Linear, TensorMap
from maxlm.convert.qwen import QK_NORMS, qwen_keys

_MOE = LAYER + "mlp."
QWEN3_MOE_TENSORS = LLAMA_TENSORS + QK_NORMS + (
    TensorMap(("moe", "router"), _MOE + "gate.weight", Linear(1)),
    TensorMap(("moe", "gate"), _MOE + "experts.{e}.gate_proj.weight", Linear(1)),
    TensorMap(("moe", "up"), _MOE + "experts.{e}.up_proj.weight", Linear(1)),
    TensorMap(("moe", "down"), _MOE + "experts.{e}.down_proj.weight", Linear(1)),
)

QWEN3_MOE_CONFIG_KEYS = qwen_keys({"n_kv_heads": 4}) + (
    ConfigKey("num_experts", "num_experts", 128),
    ConfigKey("num_experts_per_tok", "experts_per_token", 8),
    ConfigKey("moe_intermediate_size", "moe_ffn_dim", 768),
    ConfigKey("norm_topk_prob", "router_renormalize", False),
    ConfigKey("router_aux_loss_coef", "load_balance_coef", 0.001, training_only=True),
)

QWEN3_MOE_FIXED: dict[str, Any] = {"ffn": "moe", "qkv_bias": False, "qk_norm": True, "router_scoring": "softmax",
                                   "router_scale": 1.0, "shared_experts": 0}


def normalize(hf: dict[str, Any]) -> dict[str, Any]:
    out = hf_options.normalize(hf)
    if out.get("num_experts") is None and "num_local_experts" in hf:  # transformers 5 writes this name
        out["num_experts"] = hf["num_local_experts"]
    return out


def hf_moe_layers(hf: dict[str, Any]) -> list[int]:
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    experts = hf.get("num_experts", 128)
    return [i for i in range(hf["num_hidden_layers"]) if i not in dense and experts > 0 and (i + 1) % step == 0]


def _layer_pattern(hf: dict[str, Any]) -> tuple[int, int] | None:
    """(first_dense_layers, moe_layer_interval) giving exactly Hugging Face's MoE layers, or None. maxlm's first
    MoE layer is first_dense_layers + interval - 1, so each interval fixes first_dense_layers."""
    want, n = hf_moe_layers(hf), hf["num_hidden_layers"]
    for every in range(1, n + 1):
        first = want[0] - every + 1 if want else -1
        if first >= 0 and ModelConfig(ffn="moe", n_layers=n, first_dense_layers=first,
                                      moe_layer_interval=every).moe_layers == want:
            return first, every
    return None


def check(hf: dict[str, Any]) -> None:
    problems = llama.common_problems(hf)
    if hf.get("attention_bias"):
        problems.append("attention_bias=true (biases on q, k, v and o; maxlm has none on o)")
    if _layer_pattern(hf) is None:
        problems.append(f"MoE layers {hf_moe_layers(hf)} (decoder_sparse_step={hf.get('decoder_sparse_step', 1)}, "
                        f"mlp_only_layers={hf.get('mlp_only_layers')}): maxlm needs first_dense_layers dense layers, "
                        f"then every moe_layer_interval-th layer MoE")
    llama.refuse("Qwen3-MoE", problems)


def derive(hf: dict[str, Any]) -> dict[str, Any]:
    first, every = _layer_pattern(hf)
    return hf_options.rope_fields(hf) | hf_options.window_all_layers(hf, absent=None) | {
        "first_dense_layers": first, "moe_layer_interval": every}


def extra_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    w = cfg.sliding_window
    dense = [i for i in range(cfg.n_layers) if not cfg.layer_is_moe(i)]
    return {"hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
            "decoder_sparse_step": 1, "mlp_only_layers": dense, "use_sliding_window": w > 0,
            "sliding_window": w or None, "output_router_logits": False,
            "moe_intermediate_size": cfg.moe_ffn_dim or cfg.ffn_dim} | hf_options.rope_hf(cfg)


QWEN3_MOE = Architecture(model_type="qwen3_moe", hf_class="Qwen3MoeForCausalLM", config_keys=QWEN3_MOE_CONFIG_KEYS,
                         tensors=QWEN3_MOE_TENSORS, fixed=QWEN3_MOE_FIXED, check=check, normalize=normalize,
                         derive=derive, extra_hf_config=extra_hf_config)
