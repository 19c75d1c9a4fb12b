"""Compile the real train step for a target the host does not have, with abstract inputs and no allocation.

The step is the one `maxlm train` runs (same mesh rules, shardings, remat, objective, optimizer and donation);
only its inputs are `jax.ShapeDtypeStruct`s, so a 70B state is never materialised. Choices that `auto` makes from
the *local* backend (compute dtype, attention kernel, grouped-matmul kernel) are resolved for the target first,
since the compiling host is a CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import jax

from maxlm.compile.targets import Target
from maxlm.config import MESH_AXES, Config, ConfigError, validate

def for_target(cfg: Config, target: Target) -> Config:
    """The config with the backend-dependent `auto` choices made for the target (as they would be on it)."""
    m = cfg.model
    dtype = "bfloat16" if m.dtype == "auto" else m.dtype
    matmul = m.moe_matmul if m.moe_matmul != "auto" else ("blocked" if target.platform == "cuda" else "ragged_dot")
    # cuDNN flash attention (what `auto` picks on a GPU) is a custom call XLA compiles only with a real GPU
    # attached, so GPU targets compile XLA attention: their temporaries include the T x T scores.
    attention = "xla" if m.attention in ("auto", "cudnn") else m.attention
    return dataclasses.replace(cfg, model=dataclasses.replace(m, dtype=dtype, moe_matmul=matmul, attention=attention))


def check_mesh(cfg: Config, target: Target) -> dict[str, int]:
    """The mesh shape on the target's devices; ConfigError (the CLI exits 1) when the counts do not match."""
    dcn = math.prod(getattr(cfg.mesh, f"dcn_{a}") for a in MESH_AXES)
    if dcn != target.slices:
        raise ConfigError(f"the target has {target.slices} slice(s) but mesh.dcn_* multiply to {dcn}; set "
                          f"mesh.dcn_data={target.slices} (or another dcn_* axis) to match --slices")
    try:
        return validate(cfg, target.devices)
    except ConfigError as e:
        raise ConfigError(f"{target.describe()}: {e}") from None


@dataclass
class Compiled:
    """The compiled step and what it took to get it."""

    executable: Any  # jax.stages.Compiled
    lowered: Any  # jax.stages.Lowered (its cost analysis where the compiled one has none)
    mesh_shape: dict[str, int]
    compile_s: float
    lower_s: float


def compile_step(cfg: Config, target: Target, devices: list[Any]) -> Compiled:
    """Builds the train step on a mesh of `devices` (compile-only devices of the target) with the run builder's
    `build_core` (the same model, optimizer, objective, layout and jitted step as `maxlm train`) and compiles it."""
    shape = check_mesh(cfg, target)
    from maxlm.mesh import build_mesh, mesh_context
    from maxlm.train.builder import build_core

    t0 = time.perf_counter()
    core = build_core(cfg, build_mesh(cfg, devices), check_backend=False)  # the host is not the target
    rng = jax.eval_shape(lambda: jax.random.key(0))
    with mesh_context(core.mesh, core.rules):
        lowered = core.step_fn.jitted.lower(core.layout.abstract, core.abstract_batch(), rng)  # type: ignore[attr-defined]
    t1 = time.perf_counter()
    executable = lowered.compile()
    t2 = time.perf_counter()
    return Compiled(executable, lowered, {a: shape[a] for a in MESH_AXES}, compile_s=t2 - t1, lower_s=t1 - t0)
