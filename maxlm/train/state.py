"""The train state and how it is created directly in its sharded layout (no host-side full copy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from maxlm.config import Config
from maxlm.mesh import LogicalRules, check_divisible, logical_specs, mesh_context, opt_state_shardings, replicated, \
    to_mesh_shardings
from maxlm.model import Decoder


@flax.struct.dataclass
class TrainState:
    """Everything the jitted step reads and writes. The two counters live on device so that the non-finite guard
    needs no host round-trip: `nonfinite_run` is the current streak of skipped (NaN/Inf) steps, which the loop
    compares with `train.max_nonfinite_steps`; `nonfinite_total` is logged. `frozen` is a tree the loss reads and
    the step never updates (a reference model, a LoRA base): sharded by the same rules, outside the optimizer."""

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite_run: jax.Array
    nonfinite_total: jax.Array
    frozen: Any = None


@dataclass
class StateLayout:
    """Shapes, logical axes and mesh shardings of the train state: computed once, used by init, the step,
    `maxlm inspect` and checkpoint restore."""

    abstract: TrainState  # ShapeDtypeStructs
    logical: Any  # logical PartitionSpecs of params
    shardings: TrainState  # NamedShardings


def init_params(model: Decoder, rng: jax.Array, seq_len: int) -> Any:
    """The model's boxed (logically partitioned) parameters from `model.init` on a short dummy row."""
    from maxlm.model.heads import init_head_params

    ids = jnp.zeros((1, min(seq_len, 8)), jnp.int32)
    return model.init(rng, ids)["params"] | init_head_params(model.cfg, rng)


def sharded_layout(boxed: Any, mesh: Mesh, rules: LogicalRules) -> tuple[Any, Any, Any]:
    """(abstract arrays, logical specs, NamedShardings) of a boxed (logically partitioned) abstract tree, with every
    sharded dimension checked to split evenly."""
    logical = logical_specs(boxed)
    abstract = nn.unbox(boxed)
    shardings = to_mesh_shardings(logical, mesh, rules)
    check_divisible(abstract, shardings, mesh)
    return abstract, logical, shardings


def state_layout(cfg: Config, model: Decoder, tx: optax.GradientTransformation, mesh: Mesh,
                 rules: LogicalRules, frozen: Any = None, params: Any = None) -> StateLayout:
    """The train state's layout; `frozen` is the boxed abstract tree of the state's frozen part (or None) and
    `params` the boxed abstract trainable tree (default: all of the model's parameters; LoRA: the adapters)."""
    boxed = params if params is not None else jax.eval_shape(lambda r: init_params(model, r, cfg.data.seq_len),
                                                             jax.random.key(0))
    abstract_params, logical, param_sh = sharded_layout(boxed, mesh, rules)
    frozen_abstract, _, frozen_sh = sharded_layout(frozen, mesh, rules) if frozen is not None else (None, None, None)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = opt_state_shardings(tx, abstract_opt, param_sh, mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(step=scalar, params=abstract_params, opt_state=abstract_opt, nonfinite_run=scalar,
                          nonfinite_total=scalar, frozen=frozen_abstract)
    shardings = TrainState(step=replicated(mesh), params=param_sh, opt_state=opt_sh, nonfinite_run=replicated(mesh),
                           nonfinite_total=replicated(mesh), frozen=frozen_sh)
    return StateLayout(abstract=abstract, logical=logical, shardings=shardings)


def init_state(cfg: Config, model: Decoder, tx: optax.GradientTransformation, layout: StateLayout, mesh: Mesh,
               rules: LogicalRules, rng: jax.Array, frozen: Any = None) -> TrainState:
    """Initialises every array on its own shards (jit with out_shardings), so a 70B model never exists whole.
    `frozen` (already sharded, or None) is placed into the state as it is."""

    def init(r: jax.Array) -> TrainState:
        params = nn.unbox(init_params(model, r, cfg.data.seq_len))
        return _fresh_state(params, tx)

    with mesh_context(mesh, rules):
        state = jax.jit(init, out_shardings=layout.shardings.replace(frozen=None))(rng)
    return state.replace(frozen=frozen)


def init_state_from_params(params: Any, tx: optax.GradientTransformation, layout: StateLayout, mesh: Mesh,
                           rules: LogicalRules, frozen: Any = None) -> TrainState:
    """Step 0 around given (already sharded) parameters, e.g. `load_parameters_from`: the optimizer state is built
    on its shards from them, so the random initialisation never has to exist beside the loaded weights."""
    with mesh_context(mesh, rules):
        state = jax.jit(lambda p: _fresh_state(p, tx), in_shardings=(layout.shardings.params,),
                        out_shardings=layout.shardings.replace(frozen=None))(params)
    return state.replace(frozen=frozen)


def _fresh_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), nonfinite_run=zero, nonfinite_total=zero)
