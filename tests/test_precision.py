"""`model.dtype: auto`: bf16 only where matmuls are native, f32 master weights and f32 norms/softmax/loss always."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from maxlm.model import Decoder
from maxlm.model import precision
from maxlm.model.layers import grad_barrier
from maxlm.model.layers import RMSNorm, compute_dtype


@pytest.mark.parametrize("backend,machine,flags,version,want", [
    ("gpu", "x86_64", set(), (0, 10), jnp.bfloat16),
    ("tpu", "x86_64", set(), (0, 10), jnp.bfloat16),
    ("cpu", "x86_64", {"avx2", "amx_bf16", "amx_tile"}, (0, 12), jnp.bfloat16),
    ("cpu", "x86_64", {"avx2", "avx512f", "avx512_bf16"}, (0, 12), jnp.bfloat16),
    ("cpu", "x86_64", {"avx2", "amx_bf16"}, (0, 10), jnp.float32),  # jax 0.10 XLA:CPU keeps bf16 dots in f32
    ("cpu", "x86_64", {"avx2", "fma"}, (0, 12), jnp.float32),  # AVX2 only: bf16 would be emulated
    ("cpu", "aarch64", {"bf16"}, (0, 12), jnp.float32),  # not measured: the exact path
])
def test_auto_dtype_per_backend(monkeypatch, backend, machine, flags, version, want) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(precision, "jax_version", lambda: version)
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    assert precision.resolve_dtype("auto", backend) == jnp.dtype(want)
    assert precision.resolve_dtype("float32", backend) == jnp.float32  # an explicit dtype is never changed


def test_cpu_flags_are_read_from_this_machine() -> None:
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    if jax.default_backend() == "cpu" and precision.platform.machine() == "x86_64":
        assert "sse2" in flags  # every x86-64 CPU has it: the parser found the flags line


def test_bf16_compute_keeps_f32_weights_norms_and_logits() -> None:
    """The bf16 path casts weights at each matmul only: master weights stay f32 and the logits, which the softmax
    and the loss consume, come out f32; RMSNorm computes in f32 and returns the input's dtype."""
    cfg = tiny_config("model.dtype=bfloat16").model
    assert compute_dtype(cfg) == jnp.bfloat16
    model = Decoder(cfg)
    b = random_batch(2, 16, cfg.vocab_size)
    params = model.init(jax.random.key(0), b["inputs"])["params"]
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    logits_bf16 = jax.jit(model.apply)({"params": params}, b["inputs"])
    assert logits_bf16.dtype == jnp.float32
    logits_f32 = jax.jit(Decoder(tiny_config("model.dtype=float32").model).apply)({"params": params}, b["inputs"])
    np.testing.assert_allclose(np.asarray(logits_bf16), np.asarray(logits_f32), atol=0.05)  # bf16: ~3 digits
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 3, cfg.d_model)), jnp.bfloat16)
    y, _ = RMSNorm(cfg).init_with_output(jax.random.key(0), x)
    assert y.dtype == jnp.bfloat16
    want = np.asarray(x, np.float32) / np.sqrt(np.mean(np.asarray(x, np.float32) ** 2, -1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=8e-3)


def test_grad_barrier_is_the_identity_with_the_same_gradient() -> None:
    x = jnp.linspace(-3.0, 3.0, 24).reshape(2, 3, 4)
    f = lambda v: jnp.sum(jax.nn.silu(v) * jnp.cos(v))  # noqa: E731
    np.testing.assert_array_equal(grad_barrier(x), x)
    np.testing.assert_allclose(jax.grad(lambda v: f(grad_barrier(v)))(x), jax.grad(f)(x), rtol=1e-6)
    # The barrier sits on the backward pass only: the forward jaxpr has none.
    assert "optimization_barrier" not in str(jax.make_jaxpr(grad_barrier)(x))
    assert "optimization_barrier" in str(jax.make_jaxpr(jax.grad(lambda v: f(grad_barrier(v))))(x))
