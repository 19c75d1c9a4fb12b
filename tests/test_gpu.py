"""The GPU path: cuDNN flash attention must compute what the XLA reference computes.

Skipped where no GPU is visible (CI, and the CPU-only suite, whose conftest pins JAX_PLATFORMS=cpu). On a GPU
machine: `JAX_PLATFORMS=cuda,cpu python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from maxlm.model import Decoder
from maxlm.model.attention import attention_impl

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")


def _config(attention: str):
    # head_dim 64: cuDNN's fused kernels need a head dim that is a multiple of 8 (and at most 256).
    return tiny_config("model.d_model=256", "model.n_heads=4", "model.n_kv_heads=2", "model.dtype=bfloat16",
                       f"model.attention={attention}", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1").model


def test_auto_picks_cudnn_for_bf16() -> None:
    assert attention_impl(_config("auto"), jnp.bfloat16) == "cudnn"
    assert attention_impl(_config("auto"), jnp.float32) == "xla"


def test_cudnn_attention_equals_xla_on_packed_documents() -> None:
    """Logits and gradients of a packed (3 documents per row) GQA batch agree between the two kernels to bf16
    precision, so packing's no-cross-document mask reaches cuDNN intact."""
    batch = {k: jnp.asarray(v) for k, v in random_batch(4, 256, 256, seed=1, docs_per_row=3).items()}
    params = Decoder(_config("xla")).init(jax.random.key(0), batch["inputs"], batch["inputs_segment_ids"],
                                          batch["inputs_positions"])["params"]

    def loss_and_logits(attention: str):
        model = Decoder(_config(attention))

        def loss(p):
            logits = model.apply({"params": p}, batch["inputs"], batch["inputs_segment_ids"],
                                 batch["inputs_positions"]).astype(jnp.float32)
            return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

        (l, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits), jax.tree_util.tree_map(np.asarray, g)

    logits_x, g_x = loss_and_logits("xla")
    logits_c, g_c = loss_and_logits("cudnn")
    np.testing.assert_allclose(logits_c, logits_x, atol=3e-2, rtol=3e-2)
    for a, b in zip(jax.tree_util.tree_leaves(g_c), jax.tree_util.tree_leaves(g_x)):
        scale = max(float(np.abs(b).max()), 1e-6)
        assert float(np.abs(a - b).max()) / scale < 5e-2
    # Packing matters: the same rows without the document mask give clearly different logits.
    unpacked = {**batch, "inputs_segment_ids": jnp.ones_like(batch["inputs_segment_ids"])}
    plain = Decoder(_config("cudnn")).apply({"params": params}, unpacked["inputs"], unpacked["inputs_segment_ids"],
                                            unpacked["inputs_positions"]).astype(jnp.float32)
    assert float(jnp.abs(plain - logits_c).max()) > 0.1
