"""The non-finite guard (one scalar decision: finite loss and gradient norm) and the cheap per-step metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from helpers import tiny_config
from maxlm.mesh import build_mesh, logical_rules, mesh_context, replicated
from maxlm.train.batch import LmBatch, batch_shardings, global_batch
from maxlm.train.builder import build_core
from maxlm.train.losses import weighted_token_ce
from maxlm.train.state import TrainState
from maxlm.train.step import make_train_step


def _toy_step():
    """make_train_step on a linear loss sum(w * mean(target weights)) of a replicated 4-vector, on the tiny mesh."""
    cfg = tiny_config()
    mesh, rules = build_mesh(cfg), logical_rules(cfg)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))
    params = {"w": jnp.ones((4,), jnp.float32)}
    zeros = [jnp.zeros((), jnp.int32) for _ in range(3)]  # distinct buffers: the step donates each one
    state = TrainState(step=zeros[0], params=params, opt_state=tx.init(params), nonfinite_run=zeros[1],
                       nonfinite_total=zeros[2])
    shardings = jax.tree_util.tree_map(lambda _: replicated(mesh), state)
    bsh = batch_shardings(LmBatch, mesh, rules)

    def loss_fn(p, batch, rng, frozen):
        x = batch.targets_weights
        return jnp.sum(p["w"] * jnp.mean(x[:, :4], axis=0)), {"weight": jnp.float32(x.shape[0])}

    step = make_train_step(loss_fn, tx, optax.constant_schedule(0.5), 1, shardings, bsh, mesh, rules)

    def batch(value: float):
        ids = np.ones((16, 8), np.int32)
        arrays = {"inputs": ids, "targets": ids, "inputs_segment_ids": ids, "inputs_positions": ids,
                  "targets_weights": np.full((16, 8), value, np.float32)}
        return global_batch(LmBatch, arrays, bsh)

    return step, jax.device_put(state, shardings), batch


def test_a_finite_loss_with_an_overflowing_gradient_norm_is_skipped() -> None:
    step, state, batch = _toy_step()
    ok = batch(1.0)
    # Every gradient entry is 1e30 (finite) and so is the loss (4e30), but the squared norm overflows float32.
    huge = batch(1e30)
def test_step_compiles_scalar_finite_checks_and_no_argmax_gather() -> None:
    """The compiled step tests two scalars (loss, gradient norm) for finiteness, not an update norm or any
    tensor, and `accuracy` gathers no argmax (value, index) pairs across the vocab-sharded logits."""
    core = build_core(tiny_config("model.n_layers=1"))
    state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   core.layout.abstract, core.layout.shardings)
    with mesh_context(core.mesh, core.rules):
        hlo = core.step_fn.jitted.lower(state, core.abstract_batch(), jax.random.key(0)).compile().as_text()
    finite = [line for line in hlo.splitlines() if " is-finite(" in line]
    assert finite and all(line.split("=")[1].split()[0] == "pred[]" for line in finite)
    gathers = [line for line in hlo.splitlines() if " all-gather(" in line]
    assert gathers and not [line for line in gathers if line.split("=")[1].split()[0].startswith("s32")]


def test_accuracy_equals_argmax_accuracy_without_ties() -> None:
    rs = np.random.RandomState(0)
    logits = rs.normal(size=(3, 7, 11)).astype(np.float32)
    targets = rs.randint(0, 11, size=(3, 7))
    targets[0, :4] = logits[0, :4].argmax(-1)  # some hits
    weights = (rs.uniform(size=(3, 7)) > 0.3).astype(np.float32)
    _, m = weighted_token_ce(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    want = ((logits.argmax(-1) == targets) * weights).sum() / weights.sum()
    assert want > 0
    np.testing.assert_allclose(float(m["accuracy"]), want, rtol=1e-6)
    # And the log-sum-exp keeps its exact value and gradient.
    ce = lambda x: weighted_token_ce(x, jnp.asarray(targets), jnp.asarray(weights))[0]  # noqa: E731
    ref = lambda x: jnp.sum((jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, jnp.asarray(targets)[..., None], -1)[  # noqa: E731
        ..., 0]) * weights) / weights.sum()
    np.testing.assert_allclose(float(ce(jnp.asarray(logits))), float(ref(jnp.asarray(logits))), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ce)(jnp.asarray(logits)), jax.grad(ref)(jnp.asarray(logits)), atol=1e-7)
