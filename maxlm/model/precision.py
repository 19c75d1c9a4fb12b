"""Which compute dtype `model.dtype: auto` means on the backend the model runs on.

Master weights stay in `model.param_dtype` (float32 by default) and are cast to the compute dtype at each matmul;
RMSNorm, RoPE, the softmax and the loss compute in float32 whatever the compute dtype (layers.py, attention.py,
losses.py). `auto` picks bfloat16 wherever bf16 matmuls run natively, because they are then faster, and float32
where bf16 would only be emulated (slower, and less precise for nothing):

  * GPU and TPU: bfloat16 (tensor cores / the MXU are built for it).
  * CPU: bfloat16 with jax >= 0.12 on a CPU with AVX-512 BF16 or AMX-BF16, where bf16 matmuls were measured
    2.6x faster than f32 (jax 0.10.2 ran them at f32 speed on the same CPU). Elsewhere float32: on an AVX2-only
    CPU bf16 is emulated and no faster (README, "Compute dtype").

The answer depends only on the machine and the installed jax, never on timing, so a config and seed reproduce the
same losses on the same machine.
"""

from __future__ import annotations

import functools
import platform

import jax
import jax.numpy as jnp

# x86 flags (Linux /proc/cpuinfo names) that give XLA:CPU native bf16 dot products.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# The first jax whose XLA:CPU ran bf16 matmuls natively where we measured (0.10.2 did not).
NATIVE_CPU_BF16_JAX = (0, 12)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.__version__.split(".")[:2] if p.isdigit())


def native_bf16_matmul(backend: str | None = None) -> bool:
    """Whether bf16 matmuls run natively (faster than f32) on `backend` (default: jax's default backend)."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return True
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # unmeasured: keep the exact path
    return jax_version() >= NATIVE_CPU_BF16_JAX and bool(cpu_flags() & set(BF16_CPU_FLAGS))


def resolve_dtype(name: str, backend: str | None = None) -> jnp.dtype:
    """`model.dtype` as a dtype: `auto` is bfloat16 where bf16 matmuls are native, else float32."""
    if name == "auto":
        return jnp.dtype(jnp.bfloat16 if native_bf16_matmul(backend) else jnp.float32)
    return jnp.dtype(name)
