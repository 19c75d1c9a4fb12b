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
    step: jax.Array
    params: Any
    opt_state: Any


@dataclass
class StateLayout:
    """Shapes, logical axes and mesh shardings of the train state: computed once, used by init, the step,
    `maxlm inspect` and checkpoint restore."""

    abstract: TrainState  # ShapeDtypeStructs
    logical: Any  # logical PartitionSpecs of params
    shardings: TrainState  # NamedShardings


def _init_params(model: Decoder, rng: jax.Array, seq_len: int) -> Any:
    ids = jnp.zeros((1, min(seq_len, 8)), jnp.int32)
    return model.init(rng, ids)["params"]


def state_layout(cfg: Config, model: Decoder, tx: optax.GradientTransformation, mesh: Mesh,
                 rules: LogicalRules) -> StateLayout:
    boxed = jax.eval_shape(lambda r: _init_params(model, r, cfg.data.seq_len), jax.random.key(0))
    logical = logical_specs(boxed)
    abstract_params = nn.unbox(boxed)
    param_sh = to_mesh_shardings(logical, mesh, rules)
    check_divisible(abstract_params, param_sh, mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = opt_state_shardings(tx, abstract_opt, param_sh, mesh)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt)
    shardings = TrainState(step=replicated(mesh), params=param_sh, opt_state=opt_sh)
    return StateLayout(abstract=abstract, logical=logical, shardings=shardings)


def init_state(cfg: Config, model: Decoder, tx: optax.GradientTransformation, layout: StateLayout, mesh: Mesh,
               rules: LogicalRules, rng: jax.Array) -> TrainState:
    """Initialises every array on its own shards (jit with out_shardings), so a 70B model never exists whole."""

    def init(r: jax.Array) -> TrainState:
        params = nn.unbox(_init_params(model, r, cfg.data.seq_len))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    with mesh_context(mesh, rules):
        return jax.jit(init, out_shardings=layout.shardings)(rng)
