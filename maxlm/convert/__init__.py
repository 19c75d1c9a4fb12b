"""Hugging Face <-> maxlm conversion: architecture tables over generic, one-tensor-at-a-time I/O.

Modules: `mapping` (the table vocabulary), the family tables `llama`, `mistral`, `qwen` (Qwen2, Qwen3), `mixtral`,
`qwen3_moe`, with `hf_options` (RoPE scaling and sliding window, shared), `families` (the registry and config.json
-> `model:`, without jax), `hf` (the operations: from_hf, to_hf, load_hf_params), `layout` (units: per-layer
tensors, independent of scanned/unscanned layouts), `params_store` (maxlm checkpoint parameters through
tensorstore), `safetensors_io` (lazy reading, streaming writing), `cli` (`maxlm convert`).

Nothing is imported here, so reading a config.json (`model.from_hf`) never loads jax.
"""
