"""The decoder: parameter counts, packing isolation, scan/remat equivalence, logical axes on every parameter."""

from __future__ import annotations

import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from maxlm.config import config_dir, load_config
from maxlm.flops import count_params, flops_per_token
from maxlm.model import Decoder, abstract_params, count_params_eval_shape

PRESETS = sorted(glob.glob(os.path.join(config_dir(), "models", "*.yml")))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.basename(p))
def test_param_count_matches_formula(path: str) -> None:
    m = load_config(path).model
    assert count_params_eval_shape(m) == count_params(m).total


def test_llama3_8b_exact_count() -> None:
    m = load_config(os.path.join(config_dir(), "models", "llama3-8b.yml")).model
    assert count_params(m).total == 8_030_261_248 == count_params_eval_shape(m)
    # 6N + attention term, with N_matmul = N - embedding table - norms.
    n_matmul = 8_030_261_248 - 128256 * 4096 - (2 * 32 + 1) * 4096
    assert flops_per_token(m, 8192) == 6 * n_matmul + 12 * 32 * 32 * 128 * 8192


def test_every_param_has_logical_axes() -> None:
    boxed = abstract_params(tiny_config().model)
    for leaf in jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == len(leaf.value.shape)
    assert abstract_params(tiny_config().model)["layers"]["attn"]["q"].names == ("layers", "embed", "heads", "head_dim")


def _init(cfg, seq_len: int = 16):
    model = Decoder(cfg.model)
    params = model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"]
    return model, nn.unbox(params)


def test_packed_document_logits_equal_alone() -> None:
    """A document's logits do not depend on what it is packed beside (segment mask + restarting positions)."""
    cfg = tiny_config()
    model, params = _init(cfg)
    rs = np.random.RandomState(0)
    a, b, c = (rs.randint(4, 256, size=n).astype(np.int32) for n in (11, 7, 14))
    row = np.concatenate([a, b, c])[None]
    seg = np.concatenate([np.full(11, 1), np.full(7, 2), np.full(14, 3)])[None].astype(np.int32)
    pos = np.concatenate([np.arange(11), np.arange(7), np.arange(14)])[None].astype(np.int32)
    apply = jax.jit(model.apply)
    packed = apply({"params": params}, row, seg, pos)
    for doc, start in ((a, 0), (b, 11), (c, 18)):
        alone = apply({"params": params}, doc[None])
        np.testing.assert_allclose(packed[0, start:start + len(doc)], alone[0], rtol=1e-5, atol=1e-5)
    # Without the segment mask the middle document would see its predecessor: the test can fail.
    unmasked = apply({"params": params}, row, np.ones_like(seg), pos)
    assert not np.allclose(unmasked[0, 11:18], packed[0, 11:18], atol=1e-4)


@pytest.mark.parametrize("variant", [["model.scan_layers=false"], ["model.remat=full"], ["model.remat=dots"],
                                     ["model.remat=dots_no_batch", "model.scan_layers=false"]])
def test_scan_and_remat_do_not_change_the_math(variant: list[str]) -> None:
    base = tiny_config()
    other = tiny_config(*variant)
    model, params = _init(base)
    batch = random_batch(2, 16, 256, docs_per_row=2)

    def loss(m, p):
        logits = m.apply({"params": p}, batch["inputs"], batch["inputs_segment_ids"], batch["inputs_positions"])
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    other_model = Decoder(other.model)
    other_params = params
    if not other.model.scan_layers:  # unstack the scanned layer params into layers_0, layers_1, ...
        stacked = params["layers"]
        other_params = {k: v for k, v in params.items() if k != "layers"}
        for i in range(base.model.n_layers):
            other_params[f"layers_{i}"] = jax.tree_util.tree_map(lambda x: x[i], stacked)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
    l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(other_model, p)))(other_params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    np.testing.assert_allclose(g1["embed"]["embedding"], g2["embed"]["embedding"], rtol=1e-4, atol=1e-7)


def test_tied_embeddings_have_no_head() -> None:
    cfg = tiny_config("model.tie_embeddings=true")
    _, params = _init(cfg)
    assert "lm_head" not in params
    assert count_params_eval_shape(cfg.model) == count_params(cfg.model).total


def test_gqa_matches_repeated_kv_heads() -> None:
    """GQA with K kv heads equals MHA whose kv heads are the K heads each repeated N/K times."""
    gqa = tiny_config()  # 4 heads, 2 kv heads
    mha = tiny_config("model.n_kv_heads=4")
    model, params = _init(gqa)
    mparams = jax.tree_util.tree_map(lambda x: x, params)
    attn = dict(params["layers"]["attn"])
    for name in ("k", "v"):
        attn[name] = jnp.repeat(attn[name], 2, axis=2)  # [L, D, K, H] -> [L, D, N, H]
    mparams = dict(params) | {"layers": dict(params["layers"]) | {"attn": attn}}
    ids = np.arange(4, 20, dtype=np.int32)[None]
    np.testing.assert_allclose(model.apply({"params": params}, ids),
                               Decoder(mha.model).apply({"params": mparams}, ids), rtol=1e-5, atol=1e-5)
