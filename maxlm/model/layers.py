"""Building blocks of the decoder: parameters with logical axes, RMSNorm, the embedding (RoPE: rope.py).

Every parameter is created through `param` so it carries logical axis names; which mesh axes those map to is
decided only by the rules table in the config (`mesh.rules`), never here.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxlm.config import ModelConfig
from maxlm.model.lora import adapter_delta, adapts
from maxlm.model.precision import resolve_dtype

Names = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]


def param(module: nn.Module, name: str, init: Initializer, shape: tuple[int, ...], names: Names,
          dtype: Any) -> jax.Array:
    """Declares a parameter tagged with logical axis names (one per dimension)."""
    assert len(shape) == len(names), (name, shape, names)
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def project(module: nn.Module, name: str, x: jax.Array, eq: str, shape: tuple[int, ...], names: Names) -> jax.Array:
    """A weight projection: declares the weight `name` (logical axes `names`, `model.init_std` normal init, stored
    in `param_dtype`), casts it to the compute dtype and contracts it with `x` by the einsum `eq`.

    Every dense projection of the decoder (q, k, v, o, gate, up, down, shared experts) goes through here, so the
    LoRA adapters (maxlm.model.lora) are added in this one place: when the module's `lora` spec selects the weight
    (by its path, e.g. `layers/attn/q`), a low-rank term s * x A B is added to the output.
    """
    c = module.cfg
    dtype = compute_dtype(c)
    w = param(module, name, nn.initializers.normal(c.init_std), shape, names, jnp.dtype(c.param_dtype))
    y = jnp.einsum(eq, x, w.astype(dtype))
    if adapts(module, name):
        y = y + adapter_delta(module, name, x, eq, shape, names, module.lora, dtype).astype(y.dtype)
    return y


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """Pins an activation's sharding by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, names)


@jax.custom_vjp
def grad_barrier(x: jax.Array) -> jax.Array:
    """Identity whose cotangent passes through `jax.lax.optimization_barrier`.

    Why: in float32, XLA:CPU (jax 0.12) fused the SwiGLU backward's silu-gradient arithmetic into the transposing
    copy that feeds the gate/up weight-gradient dot, which then read the saved activations in strided order (about
    a quarter of the step's compute). Materialising d(gate) and d(up) first leaves that copy a plain one.
    """
    return x


def _grad_barrier_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _grad_barrier_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    return (jax.lax.optimization_barrier(g),)


grad_barrier.defvjp(_grad_barrier_fwd, _grad_barrier_bwd)


def swiglu(module: nn.Module, x_BTD: jax.Array, D: int, F: int, names: tuple[str, str, str]) -> jax.Array:
    """down(silu(x W_gate) * (x W_up)) with weights named `names` (the dense MLP, MoE shared experts)."""
    gate, up, down = names
    gate_BTF = grad_barrier(project(module, gate, x_BTD, "btd,df->btf", (D, F), ("embed", "mlp")))
    up_BTF = grad_barrier(project(module, up, x_BTD, "btd,df->btf", (D, F), ("embed", "mlp")))
    h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("act_batch", "act_length", "act_mlp"))
    return project(module, down, h_BTF, "btf,fd->btd", (F, D), ("mlp", "embed"))


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """The matmul dtype: `model.dtype`, where `auto` is bfloat16 on backends with native bf16 matmuls and float32
    elsewhere (maxlm.model.precision says which)."""
    return resolve_dtype(cfg.dtype)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * scale, always computed in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale_D = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), jnp.dtype(self.cfg.param_dtype))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x32 * scale_D.astype(jnp.float32)).astype(x.dtype)


class Embed(nn.Module):
    """Token embedding; with tied embeddings the table is also the LM head (maxlm.model.heads)."""

    cfg: ModelConfig

    def setup(self) -> None:
        c = self.cfg
        self.embedding = param(self, "embedding", nn.initializers.normal(c.init_std), (c.vocab_size, c.d_model),
                               ("vocab", "embed"), jnp.dtype(c.param_dtype))

    def __call__(self, ids_BT: jax.Array) -> jax.Array:
        dtype = compute_dtype(self.cfg)
        # Gather from a replicated copy, like every FSDP weight is all-gathered before use: a gather from a
        # vocab/embed-sharded table would come out sharded on D and need an all-to-all to reach batch sharding.
        table_VD = constrain(self.embedding.astype(dtype), (None, None))
        x_BTD = jnp.take(table_VD, ids_BT, axis=0)
        return constrain(x_BTD, ("act_batch", "act_length", "act_embed"))
