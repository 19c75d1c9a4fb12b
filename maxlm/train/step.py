"""The one jitted train step, for every objective: grads of a pluggable loss, accumulation, the optimizer.

Gradient accumulation splits the global batch into `grad_accum` microbatches and scans over them. Row r of the
global batch goes to microbatch r % k, so every device holds rows of every microbatch (splitting the batch into
contiguous blocks would put a whole microbatch on a fraction of the devices). Each loss is a mean over its own
weighted units and reports their count as metrics["weight"]; the step combines microbatches as
sum_i w_i * loss_i / sum_i w_i (and the same for gradients), which equals the loss of the whole batch at once.

Non-finite guard: a step whose loss or gradient norm is NaN/Inf keeps the parameters and optimizer state exactly as
they were, and the step counts it in `state.nonfinite_run` (the current streak, which the loop compares with
`train.max_nonfinite_steps`) and `state.nonfinite_total`. The step counter still advances, because the batch was
consumed: a resumed run then reads the same data as an uninterrupted one. A finite loss and a finite gradient norm are enough: the gradient is
then finite leaf by leaf (its squares sum to a finite number), clipping scales it by a finite factor, and AdamW of a
finite gradient and finite moments is finite (no separate update-norm reduction, which cost one more all-reduce).
The decision is one scalar, computed once and materialised behind an optimization barrier so XLA does not re-derive
it inside every parameter's select fusion (jax 0.12 on the 2-layer CPU benchmark: 80 is-finite ops without the
barrier, 2 with it; jax 0.10.2 expands the barrier early and still copies the two scalar tests into each fusion),
then applied by one select per leaf, fused into that leaf's optimizer update (in place on the donated state; no
host round-trip).

Per-step metrics avoid collectives of their own: `accuracy` reuses the softmax's max (losses.py), and `param_norm`,
a reduction over every sharded parameter, is not part of the step: `run.param_norm(params)` is a separate small
program (compiled once) that the loop calls on logged steps only.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from maxlm.mesh import LogicalRules, mesh_context, replicated
from maxlm.train.losses import Batch, LossFn, Metrics
from maxlm.train.state import TrainState

StepFn = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]
# (params before the step, params after the optimizer, the step's `stats`) -> params: a non-gradient update applied
# inside the jitted step, e.g. DeepSeek-V3's router-bias balancing (maxlm.model.moe.router_bias_update).
ParamHook = Callable[[Any, Any, Any], Any]


def _split_microbatches(batch: Batch, k: int, shardings: Batch) -> Batch:
    """[n, ...] leaves -> [k, n / k, ...]: microbatch i holds examples i, i + k, ... of every field (the leading dim
    of every field is the example dim, so rows and pairs stay whole)."""

    def split(x: jax.Array, sharding: NamedSharding) -> jax.Array:
        b = x.shape[0] // k
        x = x.reshape((b, k) + x.shape[1:]).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, *sharding.spec)
        return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))

    return jax.tree_util.tree_map(split, batch, shardings)


def grads_and_metrics(loss_fn: LossFn, params: Any, batch: Batch, rng: jax.Array, k: int, shardings: Batch,
                      frozen: Any = None) -> tuple[Any, Metrics]:
    """Weighted-mean loss and gradients over the global batch, in k microbatches. Every metric (and the `stats`
    tree) is combined with the loss's own weights, so the result equals one pass over the whole batch."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng, frozen)
        return grads, metrics | {"loss": loss}

    micro = _split_microbatches(batch, k, shardings)

    def body(carry: tuple[Any, Metrics], xs: tuple[Batch, jax.Array]) -> tuple[tuple[Any, Metrics], None]:
        g_acc, m_acc = carry
        mb, r = xs
        (loss, metrics), grads = grad_fn(params, mb, r, frozen)
        w = metrics["weight"]
        g_acc = jax.tree_util.tree_map(lambda a, g: a + w * g.astype(a.dtype), g_acc, grads)
        weighted = {key: jax.tree_util.tree_map(lambda v: v * w, v) for key, v in (metrics | {"loss": loss}).items()
                    if key != "weight"} | {"weight": w}
        return (g_acc, jax.tree_util.tree_map(jnp.add, m_acc, weighted)), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    (_, abstract_m), _ = jax.eval_shape(lambda: grad_fn(params, first, rng, frozen))
    m0 = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), abstract_m | {"loss": abstract_m["weight"]})
    (g_sum, m_sum), _ = jax.lax.scan(body, (zeros, m0), (micro, jax.random.split(rng, k)))
    total = m_sum["weight"]
    denom = jnp.maximum(total, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, g_sum)
    metrics = {key: jax.tree_util.tree_map(lambda v: v / denom, v) for key, v in m_sum.items() if key != "weight"}
    return grads, metrics | {"weight": total}


def step_is_finite(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """The guard's one scalar decision: a finite loss and gradient norm (see the module docstring for why that is
    enough). The optimization barrier makes it a materialised scalar that every select reads, instead of a
    computation XLA duplicates into each select fusion."""
    (finite,) = jax.lax.optimization_barrier((jnp.isfinite(loss) & jnp.isfinite(grad_norm),))
    return finite


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the step was finite, else `old`, leaf by leaf (an elementwise select that XLA fuses and, with the
    donated state, performs in place)."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule, grad_accum: int,
                    state_shardings: TrainState, batch_shardings: Batch, mesh: Mesh,
                    rules: LogicalRules, param_hook: ParamHook | None = None) -> StepFn:
    """Compiles `step(state, batch, rng) -> (state, metrics)` with explicit shardings (one per batch leaf, from the
    batch type's declaration: maxlm.train.batch) and a donated state. `state.frozen` reaches the loss untouched."""

    def step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(rng, state.step)
        frozen = jax.lax.stop_gradient(state.frozen)
        grads, metrics = grads_and_metrics(loss_fn, state.params, batch, rng, grad_accum, batch_shardings, frozen)
        stats = metrics.pop("stats", None)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if param_hook is not None:
            params = param_hook(state.params, params, stats)
        grad_norm = optax.tree.norm(grads)
        finite = step_is_finite(metrics["loss"], grad_norm)
        params, opt_state = keep_if_finite(finite, (params, opt_state), (state.params, state.opt_state))
        skipped = 1 - finite.astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  nonfinite_run=(state.nonfinite_run + 1) * skipped,
                                  nonfinite_total=state.nonfinite_total + skipped)
        metrics = metrics | {"grad_norm": grad_norm, "lr": schedule(state.step),
                             "nonfinite_run": new_state.nonfinite_run, "nonfinite_steps": new_state.nonfinite_total}
        return new_state, metrics

    jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings, replicated(mesh)),
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))

    def run(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        with mesh_context(mesh, rules):
            return jitted(state, batch, rng)

    param_norm = jax.jit(optax.tree.norm, in_shardings=(state_shardings.params,), out_shardings=replicated(mesh))

    run.jitted = jitted  # type: ignore[attr-defined]
    # Global L2 norm of the parameters, for logged steps only (the loop calls it; one small compile per run).
    run.param_norm = param_norm  # type: ignore[attr-defined]
    return run
