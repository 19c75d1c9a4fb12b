"""Assemble once, loop simply: the one place that builds a run's mesh, model, state, step, data and evaluator.

`build_core` makes everything that needs no data and allocates nothing (mesh, rules, model, optimizer, objective,
state layout, the jitted step): `maxlm bench`, compiling for a target, generation and evaluation reuse it.
`build_run` adds the data pipeline, the state (resumed, loaded or fresh) and the evaluator for `maxlm train`.
Order matters for users: the config, the data and the shapes are checked before anything compiles, so every
mistake costs a second, not a compile.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator

import jax
import optax

from maxlm.config import Config, ConfigError, validate
from maxlm.flops import HARDWARE, Hardware, detect_hardware, flops_per_token
from maxlm.mesh import LogicalRules, build_mesh, logical_rules, process_rows
from maxlm.model import Decoder
from maxlm.model.lora import lora_spec
from maxlm.model.moe import router_bias_update, uses_router_bias
from maxlm.train.batch import abstract_batch, batch_shardings, global_batch
from maxlm.checkpoint_format import read_meta
from maxlm.train.checkpoint import Checkpointer
from maxlm.train.evaluate import make_evaluator
from maxlm.train.memory_guard import check_memory
from maxlm.train.lora_state import LoraFrozen, check_base_pointer, init_lora_state, load_base, lora_layout, \
    lora_loss
from maxlm.train.objectives import OBJECTIVES, Objective
from maxlm.train.optimizer import make_optimizer
from maxlm.train.preference_batch import preference_sizes
from maxlm.train.reference import uses_frozen
from maxlm.train.preference_run import frozen_abstract, load_start_params, preference_stream, reference_params
from maxlm.train.state import StateLayout, TrainState, init_state, init_state_from_params, state_layout
from maxlm.train.step import StepFn, make_train_step

log = logging.getLogger(__name__)


@dataclass
class Core:
    """What every path that runs the train step shares, with no data and no allocated state."""

    cfg: Config
    mesh: jax.sharding.Mesh
    rules: LogicalRules
    model: Decoder
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    objective: Objective
    layout: StateLayout
    batch_shardings: Any  # the objective's batch type with a NamedSharding per field
    step_fn: StepFn

    def abstract_batch(self) -> Any:
        """ShapeDtypeStructs of one global batch (global_batch_size rows of data.seq_len), sharded."""
        sizes = {"rows": self.cfg.train.global_batch_size, "length": self.cfg.data.seq_len} | preference_sizes(self.cfg)
        return abstract_batch(self.objective.batch_type, sizes, self.batch_shardings)


@dataclass
class Run:
    """Everything a training or benchmark run needs, built and checked in one place."""

    core: Core
    state: TrainState
    batches: Iterator[Any]  # typed global batches
    data_iter: Any  # the grain iterator: each process's position goes into checkpoints
    hardware: Hardware | None
    flops_per_token: float
    rng: jax.Array = field(default_factory=lambda: jax.random.key(0))  # folded with the step inside the step
    checkpointer: Checkpointer | None = None
    resumed_from: int | None = None  # the checkpoint step this run continues from
    # Held-out evaluation, called with the train state every `train.eval_every` steps; returns scalars that are
    # logged with an `eval_` prefix.
    evaluate: Callable[[TrainState], dict[str, float]] | None = None

    # The core's pieces, read through the run (loop, bench and tests use them).
    cfg = property(lambda self: self.core.cfg)
    mesh = property(lambda self: self.core.mesh)
    rules = property(lambda self: self.core.rules)
    model = property(lambda self: self.core.model)
    layout = property(lambda self: self.core.layout)
    step_fn = property(lambda self: self.core.step_fn)


def resolve_hardware(cfg: Config) -> Hardware | None:
    if cfg.train.hardware == "auto":
        return detect_hardware(jax.devices()[0].device_kind)
    if cfg.train.hardware in ("cpu", "none"):
        return None
    if cfg.train.hardware not in HARDWARE:
        raise ConfigError(f"train.hardware={cfg.train.hardware!r} is not one of auto, cpu, none, "
                          f"{', '.join(HARDWARE)}; it names the peak-FLOP table entry for MFU")
    return HARDWARE[cfg.train.hardware]


def enable_compile_cache(path: str) -> None:
    """Persistent XLA cache: a resumed or repeated run loads its executables instead of compiling them."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def build_core(cfg: Config, mesh: jax.sharding.Mesh | None = None, *, check_backend: bool = True) -> Core:
    """Validates the config against the mesh's devices (default: all of this process's view, `jax.devices()`) and
    builds the model, optimizer, objective, state layout and the jitted step. Nothing is allocated."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
    shape = validate(cfg, len(devices))
    hardware = resolve_hardware(cfg)
    if check_backend and cfg.model.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"model.attention=cudnn needs an NVIDIA GPU (this backend is {jax.default_backend()}); "
                          f"use model.attention=auto (cuDNN on GPU, XLA elsewhere) or xla")
    if check_backend:  # running here: this machine's devices must hold the step (before anything is allocated)
        check_memory(cfg, shape, hardware.hbm_bytes if hardware else None)
    mesh = mesh if mesh is not None else build_mesh(cfg)
    rules = logical_rules(cfg)
    # With LoRA (maxlm.model.lora) the model carries adapters, the state trains only them and the loss sees the
    # base joined back in (maxlm.train.lora_state); nothing else in the step changes.
    spec = lora_spec(cfg)
    model = Decoder(cfg.model, lora=spec)
    tx, schedule = make_optimizer(cfg)
    objective = OBJECTIVES[cfg.train.objective]
    loss = objective.make_loss(cfg, model)
    if spec is not None:  # dpo.reference=base: the base without adapters is the reference (no second copy)
        layout = lora_layout(cfg, model, tx, mesh, rules, objective_frozen=frozen_abstract(cfg))
        loss = lora_loss(loss, base_is_reference=cfg.train.objective == "dpo" and cfg.dpo.reference == "base")
    else:
        layout = state_layout(cfg, model, tx, mesh, rules, frozen=frozen_abstract(cfg))
    shardings = batch_shardings(objective.batch_type, mesh, rules)
    # A LoRA base is frozen, router bias included: DeepSeek-V3 bias balancing is a pretraining mechanism.
    hook = partial(router_bias_update, cfg.model) if uses_router_bias(cfg.model) and spec is None else None
    step_fn = make_train_step(loss, tx, schedule, cfg.train.grad_accum, layout.shardings, shardings, mesh, rules,
                              param_hook=hook)
    return Core(cfg=cfg, mesh=mesh, rules=rules, model=model, tx=tx, schedule=schedule, objective=objective,
                layout=layout, batch_shardings=shardings, step_fn=step_fn)


def initial_state(core: Core) -> TrainState:
    """Step 0: parameters from `load_parameters_from` (a maxlm checkpoint or HF directory) or a fresh init."""
    cfg = core.cfg
    if cfg.train.objective == "sft" and not cfg.load_parameters_from:
        log.warning("train.objective=sft from randomly initialised parameters; set load_parameters_from to a maxlm "
                    "checkpoint or a Hugging Face model directory to fine-tune a trained model")
    if cfg.lora.enabled:
        return init_lora_state(cfg, core.model, core.tx, core.layout, core.mesh, core.rules)
    if cfg.load_parameters_from:
        params = load_start_params(cfg.load_parameters_from, cfg, core.model, core.layout, core.mesh, core.rules)
        return init_state_from_params(params, core.tx, core.layout, core.mesh, core.rules)
    return init_state(cfg, core.model, core.tx, core.layout, core.mesh, core.rules, jax.random.key(cfg.seed))


def build_run(cfg: Config, *, resume: bool = False) -> Run:
    """Validates, builds the core and the data, then the state: with `resume`, from the newest readable checkpoint
    in `checkpoint.dir` when there is one; else from `load_parameters_from` or a fresh init."""
    core = build_core(cfg)
    enable_compile_cache(cfg.train.compile_cache_dir)
    from maxlm.data.shards import ProcessBatches  # grain is imported only when data is needed

    if cfg.data.example_format == "preference" or cfg.train.objective in ("dpo", "reward"):
        data_iter, batches = preference_stream(cfg, core.model, core.layout, core.mesh, core.rules,
                                               core.batch_shardings, jax.process_index(), jax.process_count())
    else:
        # This process's rows of each global batch, the same rows whatever the process count (maxlm.data.shards).
        rows = cfg.train.global_batch_size
        row_sharding = jax.tree_util.tree_leaves(core.batch_shardings)[0]
        data_iter = ProcessBatches(cfg.data, vocab_size=cfg.model.vocab_size, global_batch_size=rows,
                                   rows=process_rows(row_sharding, rows), seed=cfg.seed,
                                   process_index=jax.process_index(), process_count=jax.process_count(), total_steps=cfg.train.steps)
        batches = (global_batch(core.objective.batch_type, b, core.batch_shardings) for b in data_iter)
    rng = jax.random.key(cfg.seed + 1)
    checkpointer = Checkpointer(cfg, core.mesh) if resume else None
    try:
        restored = checkpointer.restore(core.layout, data_iter) if checkpointer else None
    except BaseException:
        checkpointer.close()
        raise
    if restored is not None:
        state, rng = restored.state, restored.rng
        if cfg.lora.enabled:  # the checkpoint holds the adapters; the base comes back from where it points
            step_dir = checkpointer.step_dir(restored.step)
            check_base_pointer(cfg, read_meta(step_dir), f"checkpoint {step_dir}")
            state = state.replace(frozen=LoraFrozen(base=load_base(cfg, core.layout, core.mesh, core.rules)))
        log.info("resumed from step %d in %s", restored.step, checkpointer.directory)
    else:
        state = initial_state(core)
    if uses_frozen(cfg):  # the DPO reference: rebuilt from its source on every start, never checkpointed
        reference = reference_params(cfg, core.model, core.layout, core.mesh, core.rules)
        state = state.replace(frozen=state.frozen.replace(objective=reference) if cfg.lora.enabled else reference)
    return Run(core=core, state=state, batches=batches, data_iter=data_iter, hardware=resolve_hardware(cfg),
               flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len), rng=rng, checkpointer=checkpointer,
               resumed_from=restored.step if restored else None,
               evaluate=make_evaluator(cfg, core.mesh, core.rules, core.model))  # None unless train.eval_every > 0
