#!/usr/bin/env bash
# The GPU figures in one go: environment, the GPU tests, then `maxlm bench` on one GPU for
#   - tiny (the foundation issue's reference config),
#   - a ~0.9B Llama at seq 2048 in bf16: cuDNN vs XLA attention, no remat vs dots remat,
#   - MoE vs the dense model with the same active parameters: the MoE issue's CPU config (2 layers, d 256,
#     4 experts top-2 of width 512, seq 128) and a GPU-sized one (8 layers, d 1024, 8 experts top-2 of 2816):
#     dropless with the blocked grouped matmul (auto on GPU) and with ragged_dot, and the capacity path.
# Run from the repo root on a one-GPU machine where maxlm's dependencies import (PYTHONPATH=. is enough):
#   bash tests/benchmarks/gpu.sh [OUT_DIR]
# Writes OUT_DIR/gpu_bench.jsonl (one `maxlm bench --json` line per config) and prints everything.
set -uo pipefail
out=${1:-.}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import jax, flax, optax, orbax.checkpoint as o, grain; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'grain', grain.__version__ if hasattr(grain, '__version__') else '?', jax.devices())"

$py -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -5
$py tests/benchmarks/bench_ragged_dot.py

one="mesh.data=1,mesh.fsdp=1,mesh.tensor=1"
# ~0.9B: d 2048, 16 layers, 16 heads / 8 KV heads, SwiGLU 5632, vocab 32000 (TinyLlama-like widths, more depth).
b1="$one,data.source=synthetic,data.seq_len=2048,model.vocab_size=32000,model.d_model=2048,model.n_layers=16"
b1="$b1,model.n_heads=16,model.n_kv_heads=8,model.ffn_dim=5632,model.rope_theta=10000.0"
moe_s="$one,mesh.expert=1,model.d_model=256,model.num_experts=4,model.moe_ffn_dim=512,data.seq_len=128"
moe_m="$one,mesh.expert=1,model.d_model=1024,model.n_layers=8,model.n_heads=8,model.n_kv_heads=8"
moe_m="$moe_m,model.vocab_size=32000,model.num_experts=8,model.moe_ffn_dim=2816,data.seq_len=2048"
$py tests/benchmarks/bench_step.py --steps 20 \
  "tiny:$one" \
  "llama3-8b:$b1,train.global_batch_size=4,model.remat=none,model.attention=cudnn" \
  "llama3-8b:$b1,train.global_batch_size=4,model.remat=none,model.attention=xla" \
  "llama3-8b:$b1,train.global_batch_size=8,model.remat=dots,model.attention=cudnn" \
  "llama3-8b:$b1,train.global_batch_size=16,model.remat=full,model.attention=cudnn" \
  "tiny-moe:$moe_s,train.global_batch_size=64" \
  "tiny-moe:$moe_s,train.global_batch_size=64,model.ffn=mlp,model.ffn_dim=1024" \
  "tiny-moe:$moe_m,train.global_batch_size=8" \
  "tiny-moe:$moe_m,train.global_batch_size=8,model.moe_matmul=ragged_dot" \
  "tiny-moe:$moe_m,train.global_batch_size=8,model.capacity_factor=1.25" \
  "tiny-moe:$moe_m,train.global_batch_size=8,model.ffn=mlp,model.ffn_dim=5632" \
  | tee "$out/gpu_bench.jsonl"
