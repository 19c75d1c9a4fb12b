"""Hugging Face <-> maxlm conversion: architecture tables over generic, one-tensor-at-a-time I/O.

Modules: `mapping` (the table vocabulary), the family tables `llama`, `mistral`, `qwen` (Qwen2, Qwen3), `mixtral`,
`qwen3_moe`, with `hf_options` (RoPE scaling and sliding window, shared), `hf` (the registry and the operations),
`layout` (units: per-layer tensors, independent of scanned/unscanned layouts), `params_store` (maxlm checkpoint
parameters through tensorstore), `safetensors_io` (lazy reading, streaming writing), `cli` (`maxlm convert`).
"""

from maxlm.convert.hf import ARCHITECTURES, from_hf, hf_config_from_model, load_hf_params, model_config_from_hf, \
    resolve_model_from_hf, to_hf

__all__ = ["ARCHITECTURES", "from_hf", "hf_config_from_model", "load_hf_params", "model_config_from_hf",
           "resolve_model_from_hf", "to_hf"]
