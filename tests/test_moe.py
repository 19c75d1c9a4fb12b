"""Mixture-of-Experts: routing, losses (against Hugging Face's), both expert paths against a dense reference,
expert parallelism, the layer stack, presets, metrics and DeepSeek-V3's bias update."""

from __future__ import annotations

import dataclasses
import os
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import F32, random_batch
from maxlm.config import ConfigError, ModelConfig, config_dir, load_config, resolve_config_path, validate
from maxlm.flops import attention_params, count_params, flops_per_token
from maxlm.mesh import build_mesh, logical_rules, mesh_context
from maxlm.train.batch import LmBatch, global_batch, local_batch
from maxlm.model import Decoder, abstract_params, count_params_eval_shape
from maxlm.model.grouped_matmul import blocked_grouped_matmul, tiled_grouped_matmul
from maxlm.model.moe import MoE, capacity_per_sequence, load_balance_loss, route, router_bias_update, router_z_loss
from maxlm.model.stack import layer_groups, layer_kinds, layer_subtree
from maxlm.train.objectives import OBJECTIVES
from maxlm.train.builder import build_core
from maxlm.train.state import init_state_from_params

SMALL = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, ffn="moe",
                    num_experts=8, experts_per_token=2, moe_ffn_dim=16, dtype="float32")


def _random_like(abstract: dict, seed: int, std: float) -> dict:
    """Random values for a tree of parameter shapes, drawn on the host: compiling `init` costs seconds per model,
    and these tests compare models on equal weights, not initialisations. Norm scales are ones, biases zeros."""
    rs = np.random.RandomState(seed)

    def leaf(path: tuple, a: jax.ShapeDtypeStruct) -> jax.Array:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("scale", "router_bias"):
            return jnp.full(a.shape, 1.0 if name == "scale" else 0.0, a.dtype)
        return jnp.asarray(rs.normal(0.0, std, a.shape).astype(a.dtype))

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _model_params(m: ModelConfig, seed: int = 0) -> dict:
    return _random_like(nn.unbox(abstract_params(m)), seed, m.init_std)


def _moe_params(c: ModelConfig, x: jax.Array) -> dict:
    # Larger weights than init_std: routing and expert outputs then differ enough that a mistake shows.
    abstract = nn.unbox(jax.eval_shape(lambda: MoE(c).init(jax.random.key(0), x)["params"]))
    return _random_like(abstract, 0, 0.2)


def _dense_reference(p: dict, x_BTD: jax.Array, c: ModelConfig) -> jax.Array:
    """Every expert on every token, weighted by the router's combine weights (zero for unchosen experts)."""
    r = route(jnp.einsum("btd,de->bte", x_BTD, p["router"]), p.get("router_bias"), c)
    y = jnp.zeros_like(x_BTD)
    for e in range(c.num_experts):
        h = (jax.nn.silu(x_BTD @ p["gate"][e]) * (x_BTD @ p["up"][e])) @ p["down"][e]
        y = y + jnp.sum(jnp.where(r.expert_ids_BTK == e, r.weights_BTK, 0.0), -1)[..., None] * h
    return y


def _apply(c: ModelConfig, p: dict, x: jax.Array) -> tuple[jax.Array, dict]:
    return MoE(c).apply({"params": p}, x, mutable=["aux", "moe"])


def _value_and_grad(c: ModelConfig, p: dict, x: jax.Array, reference: bool = False) -> tuple[jax.Array, dict]:
    """(y, d sum(y^2) / d params), jitted (eager MoE is slow: loops and custom gradients run op by op)."""
    f = (lambda p: _dense_reference(p, x, c)) if reference else (lambda p: _apply(c, p, x)[0])
    return jax.jit(lambda p: (f(p), jax.grad(lambda q: jnp.sum(f(q) ** 2))(p)))(p)


# ---------------------------------------------------------------------------------------------------------------
# Router and losses


def test_softmax_routing_is_mixtral_top2() -> None:
    logits = jnp.array([[[2.0, 1.0, 0.5, -1.0]]])
    r = route(logits, None, dataclasses.replace(SMALL, num_experts=4))
    assert r.expert_ids_BTK.tolist() == [[[0, 1]]]
    top2 = jax.nn.softmax(jnp.array([2.0, 1.0]))  # Mixtral: softmax over the kept logits
    np.testing.assert_allclose(r.weights_BTK[0, 0], top2, rtol=1e-6)
    np.testing.assert_allclose(r.probs_BTE[0, 0], jax.nn.softmax(logits[0, 0]), rtol=1e-6)


def test_sigmoid_bias_changes_selection_not_weights() -> None:
    c = dataclasses.replace(SMALL, num_experts=4, router_scoring="sigmoid", router_scale=2.5)
    logits = jnp.array([[[2.0, 1.0, 0.5, -1.0]]])
    plain = route(logits, jnp.zeros(4), c)
    biased = route(logits, jnp.array([0.0, 0.0, 0.0, 5.0]), c)  # pushes expert 3 into the top 2
    assert plain.expert_ids_BTK.tolist() == [[[0, 1]]] and biased.expert_ids_BTK.tolist() == [[[3, 0]]]
    s = jax.nn.sigmoid(logits[0, 0])
    # Gate values are the unbiased scores of the chosen experts, normalised, times router_scale (DeepSeek-V3).
    np.testing.assert_allclose(biased.weights_BTK[0, 0], 2.5 * s[jnp.array([3, 0])] / (s[3] + s[0]), rtol=1e-6)
    g = jax.grad(lambda b: jnp.sum(route(logits, b, c).weights_BTK))(jnp.array([0.0, 0.0, 0.0, 5.0]))
    assert not np.any(g)  # the bias never receives a gradient


def test_load_balance_loss_equals_hugging_face() -> None:
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rs = np.random.RandomState(0)
    layers = [rs.randn(48, 8).astype(np.float32) * 2 for _ in range(3)]
    for logits in (layers[:1], layers):  # one layer; and HF's pooling of several layers' tokens
        want = float(load_balancing_loss_func(tuple(torch.from_numpy(x) for x in logits), num_experts=8, top_k=2))
        cat = jnp.asarray(np.concatenate(logits))
        r = route(cat, None, SMALL)
        got = float(load_balance_loss(r.probs_BTE, r.expert_ids_BTK))
        assert got == pytest.approx(want, rel=1e-5)
    # A uniform router scores k whatever it picks (f sums to k, as in HF); Switch's top-1 form scores 1.
    uniform = route(jnp.zeros((8, 8)) + jnp.eye(8) * 1e-3, None, SMALL)
    assert float(load_balance_loss(uniform.probs_BTE, uniform.expert_ids_BTK)) == pytest.approx(2.0, rel=1e-2)


def test_router_z_loss_is_st_moe() -> None:
    logits = np.random.RandomState(1).randn(2, 5, 8).astype(np.float32)
    lse = np.log(np.exp(logits).sum(-1))
    assert float(router_z_loss(jnp.asarray(logits))) == pytest.approx(float(np.mean(lse**2)), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Expert paths


@pytest.mark.parametrize("impl", ["tiled", "blocked", "ragged_dot"])
def test_dropless_equals_dense_reference(impl: str) -> None:
    c = dataclasses.replace(SMALL, moe_matmul=impl)
    x = jax.random.normal(jax.random.key(1), (4, 16, 32))
    p = _moe_params(c, x)
    y, g = _value_and_grad(c, p, x)
    y_ref, g_ref = _value_and_grad(c, p, x, reference=True)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for name in ("gate", "up", "down", "router"):
        np.testing.assert_allclose(g[name], g_ref[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("grouped_matmul", [tiled_grouped_matmul, blocked_grouped_matmul])
def test_grouped_matmuls_equal_ragged_dot(grouped_matmul) -> None:
    """Including empty groups, groups of one row, a group spanning several blocks, rows past sum(sizes) (zero)
    and both gradients."""
    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.randn(40, 6).astype(np.float32))
    w = jnp.asarray(rs.randn(5, 6, 3).astype(np.float32))
    sizes = jnp.array([0, 13, 1, 20, 0], jnp.int32)  # 34 of 40 rows
    for block in (4, 8, 16):
        mm = jax.jit(partial(grouped_matmul, block=block) if grouped_matmul is blocked_grouped_matmul
                     else partial(grouped_matmul, tile=block))
        got = mm(x, w, sizes)
        np.testing.assert_allclose(got, jax.lax.ragged_dot(x, w, sizes), rtol=1e-5, atol=1e-6)
        assert not np.any(got[34:])
        f = lambda fn: jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1))(x, w)  # noqa: E731
        for a, b in zip(f(lambda x, w: mm(x, w, sizes)), f(lambda x, w: jax.lax.ragged_dot(x, w, sizes))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_capacity_without_drops_equals_dropless_and_drop_order() -> None:
    x = jax.random.normal(jax.random.key(1), (4, 16, 32))
    p = _moe_params(SMALL, x)
    dropless, _ = jax.jit(lambda p: _apply(SMALL, p, x))(p)
    roomy = dataclasses.replace(SMALL, capacity_factor=4.0)  # C = ceil(4 * 16 * 2 / 8) = 16 = T: nothing can drop
    assert capacity_per_sequence(roomy, 16) == 16
    y, state = jax.jit(lambda p: _apply(roomy, p, x))(p)
    np.testing.assert_allclose(y, dropless, rtol=1e-5, atol=1e-6)
    assert float(state["moe"]["stats"][0]["dropped"]) == 0.0

    # Every token prefers expert 0, then expert 1: with C = 3 slots, expert 0 keeps the first 3 positions' first
    # choices, expert 1 the first 3 positions' second choices; everything else is dropped.
    c = dataclasses.replace(SMALL, num_experts=4, capacity_factor=0.75)  # ceil(0.75 * 8 * 2 / 4) = 3
    assert capacity_per_sequence(c, 8) == 3
    x8 = jax.random.normal(jax.random.key(3), (1, 8, 32))
    q = _moe_params(c, x8)
    q["router"] = jnp.zeros_like(q["router"])
    bias_logits = jnp.array([3.0, 2.0, 0.0, 0.0])
    from maxlm.model import moe as moe_lib

    r = moe_lib.route(jnp.broadcast_to(bias_logits, (1, 8, 4)), None, c)
    out, kept = jax.jit(lambda r, q: moe_lib.routed_experts(x8, r, q["gate"], q["up"], q["down"], c))(r, q)
    assert kept[0, :, 0].tolist() == [True] * 3 + [False] * 5
    assert kept[0, :, 1].tolist() == [True] * 3 + [False] * 5
    assert not np.any(out[0, 3:])


def test_capacity_order_is_rank_first() -> None:
    """Second choices never take a slot a later token's first choice needs."""
    c = dataclasses.replace(SMALL, num_experts=2, experts_per_token=2, capacity_factor=0.5)  # C = ceil(.5*4*2/2) = 2
    from maxlm.model import moe as moe_lib

    x = jax.random.normal(jax.random.key(4), (1, 4, 32))
    q = _moe_params(c, x)
    # Tokens 0, 1 prefer expert 1; tokens 2, 3 prefer expert 0. Expert 0's two slots go to tokens 2, 3 (first
    # choices), not to tokens 0, 1 (second choices) even though those come earlier in the sequence.
    logits = jnp.array([[[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    r = moe_lib.route(logits, None, c)
    _, kept = jax.jit(lambda r, q: moe_lib.routed_experts(x, r, q["gate"], q["up"], q["down"], c))(r, q)
    assert kept[0].tolist() == [[True, False], [True, False], [True, False], [True, False]]


@pytest.mark.parametrize("variant", [{"capacity_factor": 1.0}, {"moe_matmul": "blocked"}])
def test_expert_parallel_layer_matches_unsharded(variant: dict) -> None:
    """The capacity path (GShard all-to-all of fixed [E, C] buffers) with drops (capacity factor 1: drops do not
    depend on the mesh), and the dropless path with the GPU's blocked grouped matmul over the padded exchange
    (the CPU's `tiled` one is covered by the 5-step training test): forward and gradients under meshes with
    expert = 2 and 8 and tensor parallelism."""
    c = dataclasses.replace(SMALL, **variant)
    x = jax.random.normal(jax.random.key(1), (8, 16, 32))
    p = _moe_params(c, x)
    want_y, want_g = _value_and_grad(c, p, x)
    loss = lambda p, x: jnp.sum(_apply(c, p, x)[0] ** 2)  # noqa: E731
    for d, f, t, e in [(1, 2, 2, 2), (1, 1, 1, 8)]:
        cfg = load_config(resolve_config_path("tiny-moe"), [f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}",
                                                            f"mesh.expert={e}"])
        mesh, rules = build_mesh(cfg), logical_rules(cfg)
        with mesh_context(mesh, rules):
            fn = jax.jit(lambda p, x: (_apply(c, p, x)[0], jax.grad(loss)(p, x))).lower(p, x).compile()
            assert "all-to-all" in fn.as_text()  # tokens really travel to their experts
            y, g = fn(p, x)
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6, err_msg=str((d, f, t, e)))
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(want_g)):
            # Weight gradients are f32 sums over every token in another order per mesh: their rounding error
            # scales with the leaf's magnitude (up to ~100 here), so the absolute bound does too (1e-6 of it).
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()),
                                       err_msg=str((d, f, t, e)))


def _train_losses(overrides: list[str], steps: int = 5) -> tuple[np.ndarray, dict]:
    """Losses of `steps` train steps of tiny-moe (and the last step's metrics), from weights drawn on the host so
    that every mesh starts equal and only the step is compiled."""
    cfg = load_config(resolve_config_path("tiny-moe"), [F32, *overrides])
    core = build_core(cfg)
    params = jax.device_put(_model_params(cfg.model), core.layout.shardings.params)
    state = init_state_from_params(params, core.tx, core.layout, core.mesh, core.rules)
    bsh, step = core.batch_shardings, core.step_fn
    losses = []
    for i in range(steps):
        batch = global_batch(LmBatch, random_batch(cfg.train.global_batch_size, cfg.data.seq_len, cfg.model.vocab_size,
                                               seed=i, docs_per_row=2), bsh)
        state, metrics = step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(metrics)


def test_expert_parallelism_does_not_change_the_losses() -> None:
    """5 train steps of tiny-moe (dropless, its all-to-all padded to the worst case) on 8 devices with expert = 1,
    2 (beside data and tensor parallelism) and 8."""
    meshes = [(8, 1, 1, 1), (2, 1, 2, 2), (1, 1, 1, 8)]
    # Per-expert metrics (16 more step outputs) cost XLA:CPU seconds of compile: checked on one mesh only.
    results = [_train_losses([f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}", f"mesh.expert={e}",
                              f"model.moe_expert_metrics={d == 8}"]) for d, f, t, e in meshes]
    ref, metrics = results[0]
    assert ref[-1] < ref[0]
    for mesh, (got, _) in zip(meshes, results):
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=f"mesh {mesh}")
    # Per-layer metrics, logged separately from the loss they feed.
    for i in (0, 1):
        loads = [metrics[f"moe/layer{i}/load_e{j}"] for j in range(8)]
        assert sum(loads) == pytest.approx(1.0, rel=1e-5)
        assert metrics[f"moe/layer{i}/min_max_load"] == pytest.approx(min(loads) / max(loads), rel=1e-5)
        assert metrics[f"moe/layer{i}/dropped"] == 0.0 and metrics[f"moe/layer{i}/load_balance"] >= 2.0 - 1e-5
    lb = np.mean([metrics[f"moe/layer{i}/load_balance"] for i in (0, 1)]) * 0.01
    z = np.mean([metrics[f"moe/layer{i}/router_z"] for i in (0, 1)]) * 0.001
    assert metrics["moe_load_balance"] == pytest.approx(lb, rel=1e-5)
    assert metrics["aux_loss"] == pytest.approx(lb + z, rel=1e-5)
    assert metrics["loss"] == pytest.approx(metrics["ce"] + metrics["aux_loss"], rel=1e-6)


def test_router_jitter_only_with_an_rng() -> None:
    c = dataclasses.replace(SMALL, router_jitter=0.5)
    x = jax.random.normal(jax.random.key(1), (2, 16, 32))
    p = _moe_params(c, x)

    @jax.jit
    def run(key: jax.Array) -> tuple[jax.Array, ...]:
        with_rng = lambda k: MoE(c).apply({"params": p}, x, rngs={"router": k}, mutable=["aux", "moe"])[0]  # noqa
        return _apply(c, p, x)[0], _apply(SMALL, p, x)[0], with_rng(key), with_rng(jax.random.fold_in(key, 1))

    plain, no_jitter, a, b = run(jax.random.key(1))
    np.testing.assert_array_equal(plain, no_jitter)  # eval (no rng): no jitter
    assert not np.allclose(a, b) and not np.allclose(a, plain)


# ---------------------------------------------------------------------------------------------------------------
# The layer stack, counts and presets


def test_interleaved_dense_and_moe_layers() -> None:
    first = load_config(resolve_config_path("tiny-moe"), ["model.n_layers=6", "model.first_dense_layers=1",
                                                          "model.moe_layer_interval=2"]).model
    assert layer_kinds(first) == ["mlp", "mlp", "moe", "mlp", "moe", "mlp"] and first.moe_layers == [2, 4]
    assert [(g.pattern, g.repeats) for g in layer_groups(first)] == [(("mlp",), 1), (("mlp", "moe"), 2),
                                                                     (("mlp",), 1)]
    assert count_params(first).total == count_params_eval_shape(first)
    m = load_config(resolve_config_path("tiny-moe"), ["model.n_layers=5", "model.moe_layer_interval=2",
                                                      "model.shared_experts=1"]).model
    assert [(g.pattern, g.repeats) for g in layer_groups(m)] == [(("mlp", "moe"), 2), (("mlp",), 1)]
    ids = jnp.arange(64, dtype=jnp.int32).reshape(2, 32) % 256
    params = _model_params(m)
    assert params["layers"]["sub1"]["moe"]["gate"].shape == (2, 8, 64, 64)
    assert params["layers"]["sub1"]["moe"]["shared_gate"].shape == (2, 64, 64)
    logits, state = jax.jit(lambda p: Decoder(m).apply({"params": p}, ids, mutable=["aux", "moe"]))(params)
    # The same weights unscanned (one module per layer, located through layer_subtree) give the same logits.
    flat = dataclasses.replace(m, scan_layers=False)
    unscanned = {k: v for k, v in params.items() if not k.startswith("layers")}
    unscanned |= {f"layers_{i}": layer_subtree(m, params, i) for i in range(m.n_layers)}
    np.testing.assert_allclose(jax.jit(Decoder(flat).apply)({"params": unscanned}, ids), logits, rtol=1e-5,
                               atol=1e-5)
    # Rematerialised blocks still sow their statistics.
    remat = dataclasses.replace(m, remat="full")
    logits_r, state_r = jax.jit(lambda p: Decoder(remat).apply({"params": p}, ids, mutable=["aux", "moe"]))(params)
    np.testing.assert_allclose(logits_r, logits, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(state_r)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert len(jax.tree_util.tree_leaves(state["aux"])) == 2  # load_balance and router_z of the one MoE group


def test_mixtral_preset_is_exact() -> None:
    m = load_config(os.path.join(config_dir(), "models", "mixtral-8x7b.yml")).model
    pc = count_params(m)
    assert pc.total == 46_702_792_704 == count_params_eval_shape(m)
    expert = 3 * 4096 * 14336
    assert pc.active == pc.total - 32 * 6 * expert  # 2 of 8 experts per token: 12.9B active
    # FLOPs count the active matmul parameters: attention, router, two experts, the LM head.
    n_matmul = 32 * (attention_params(m) + 4096 * 8 + 2 * expert) + 32000 * 4096
    assert flops_per_token(m, 4096) == 6 * n_matmul + 12 * 32 * 32 * 128 * 4096


def test_moe_layer_count_closed_form() -> None:
    for n, fd, every in [(6, 0, 1), (6, 1, 2), (7, 2, 3), (61, 3, 1), (5, 0, 2)]:
        m = dataclasses.replace(SMALL, n_layers=n, first_dense_layers=fd, moe_layer_interval=every)
        assert m.num_moe_layers == len(m.moe_layers)
        assert count_params(m).total == count_params_eval_shape(m)


@pytest.mark.parametrize("overrides, devices, message", [
    (["model.experts_per_token=9"], 8, "model.experts_per_token=9 must be between 1 and model.num_experts=8"),
    (["model.num_experts=6", "mesh.expert=4", "mesh.data=1"], 8, "model.num_experts=6 is not divisible by the "
                                                                  "expert-parallel size 4"),
    (["model.router_scoring=relu"], 8, "model.router_scoring='relu' is not one of softmax, sigmoid"),
    (["model.first_dense_layers=2"], 8, "leave no MoE layer"),
    (["mesh.rules=[[act_batch, [data, fsdp]], [exp, expert]]"], 8, "add expert to the act_batch rule"),
    (["model.moe_ffn_dim=63", "mesh.tensor=2", "mesh.expert=1"], 8, "model.moe_ffn_dim=63 is not divisible by "
                                                                     "mesh.tensor=2"),
])
def test_moe_config_errors_name_the_key(overrides: list[str], devices: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(load_config(resolve_config_path("tiny-moe"), overrides), devices)


# ---------------------------------------------------------------------------------------------------------------
# DeepSeek-V3 bias balancing


def test_router_bias_update_moves_load_towards_balance() -> None:
    cfg = load_config(resolve_config_path("tiny-moe"), ["model.router_scoring=sigmoid", "model.router_bias_rate=0.05",
                                                        "model.moe_expert_metrics=false", "mesh.data=8",
                                                        "mesh.fsdp=1", "mesh.expert=1"])
    m = cfg.model
    model = Decoder(m)
    batch = local_batch(LmBatch, random_batch(16, 64, 256))
    params = _model_params(m)
    # Start overloaded: a selection bias that puts experts 0 and 1 in every token's top 2.
    params["layers"]["moe"]["router_bias"] = params["layers"]["moe"]["router_bias"].at[:, :2].set(0.3)
    loss_fn = jax.jit(OBJECTIVES["pretrain"].make_loss(cfg, model))
    update = jax.jit(lambda old, new, metrics: router_bias_update(m, old, new, metrics["stats"]))
    ratios = []
    for _ in range(20):
        _, metrics = loss_fn(params, batch, jax.random.key(0))
        ratios.append(float(metrics["moe/layer0/min_max_load"]))
        params = update(params, params, metrics)
    bias = params["layers"]["moe"]["router_bias"]
    assert bias.shape == (2, 8) and np.all(bias[:, :2] < 0.3) and np.all(bias[:, 2:] > 0)  # against the load
    assert ratios[0] == 0.0 and ratios[-1] > 0.2, ratios
    # Starting from the old params: whatever the optimizer did to the bias (weight decay) is discarded.
    moved = jax.tree_util.tree_map(lambda a: a + 1.0, params)
    out = update(params, moved, metrics)
    np.testing.assert_allclose(out["layers"]["moe"]["router_bias"] - bias, 0.05 * np.sign(
        1 / 8 - np.array([[metrics[f"moe/layer{i}/load_e{j}"] for j in range(8)] for i in (0, 1)])), atol=1e-6)
    assert float(out["layers"]["moe"]["router"][0, 0, 0]) == float(moved["layers"]["moe"]["router"][0, 0, 0])
    softmax = dataclasses.replace(m, router_scoring="softmax")
    assert router_bias_update(softmax, params, moved, metrics["stats"]) is moved


def test_train_step_applies_router_bias_balancing() -> None:
    """`maxlm train`'s step (built by build_run) moves each sigmoid-router bias by exactly gamma * sign(1/E - load)
    per step, from the step's own loads, and leaves softmax routers without a hook."""
    from maxlm.train.builder import build_run

    rate = 0.01
    cfg = load_config(resolve_config_path("tiny-moe"), ["model.router_scoring=sigmoid",
                                                        f"model.router_bias_rate={rate}",
                                                        "model.moe_expert_metrics=false", "train.steps=3"])
    run = build_run(cfg)
    state = run.state
    for _ in range(3):
        before = np.asarray(jax.device_get(state.params["layers"]["moe"]["router_bias"]))
        state, metrics = run.step_fn(state, next(run.batches), jax.random.key(0))
    after = np.asarray(jax.device_get(state.params["layers"]["moe"]["router_bias"]))
    loads = np.array([[float(metrics[f"moe/layer{i}/load_e{e}"]) for e in range(8)] for i in (0, 1)])
    np.testing.assert_allclose(after - before, rate * np.sign(1 / 8 - loads), atol=1e-6)
    assert np.any(after != 0)


def test_eval_runs_without_router_jitter() -> None:
    """Held-out loss is a property of the weights: router jitter (training noise) must not reach the evaluator."""
    from maxlm.train.evaluate import make_evaluator

    def eval_loss(jitter: float) -> float:
        cfg = load_config(resolve_config_path("tiny-moe"), [f"model.router_jitter={jitter}", "train.eval_every=1",
                                                            "train.eval_steps=1"])
        mesh, rules = build_mesh(cfg), logical_rules(cfg)
        evaluate = make_evaluator(cfg, mesh, rules, Decoder(cfg.model))
        return evaluate(_model_params(cfg.model))["loss"]

    assert eval_loss(0.5) == eval_loss(0.0)
