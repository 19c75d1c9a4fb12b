"""LoRA on the train side: trainable adapters apart from the frozen base, their layout, initialisation and loss.

`TrainState.params` holds only the adapters, so gradients, optimizer moments and a checkpoint's `params` and
`opt_state` items hold only them. `TrainState.frozen` is a `LoraFrozen`: the base weights (sharded by the same
rules, in `lora.base_dtype`), never touched by the optimizer, plus the objective's own frozen tree (None for
pretrain/SFT). The loss wrapper joins base and adapters into the model's parameter tree, so every objective's loss
runs unchanged. Checkpoints record a pointer to the base (`maxlm.checkpoint_format.lora_base_pointer`): a resumed
run reloads it from `load_parameters_from` (or re-creates the seeded initialisation) and checks it is the same one.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from maxlm.checkpoint_format import ITEM_PARAMS, lora_base_pointer, read_meta, resolve_step_dir, tree_shapes
from maxlm.config import Config, ConfigError
from maxlm.mesh import LogicalRules, mesh_context
from maxlm.model import Decoder
from maxlm.model.heads import SCORE
from maxlm.model.lora import A_SUFFIX, PROJECTION_NAMES, LoraSpec, base_name, join, selection_path, split_adapters
from maxlm.train.losses import LossFn
from maxlm.train.state import StateLayout, TrainState, init_params, init_state_from_params, state_layout
from maxlm.treepath import path_parts


@flax.struct.dataclass
class LoraFrozen:
    """The frozen part of a LoRA run's state: the base weights and the objective's own frozen tree (or None)."""

    base: Any
    objective: Any = None


def adapted_paths(adapters: Any) -> list[str]:
    """`layers/attn/q` for every adapted weight of an adapter tree (boxed or not)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return sorted({"/".join(path_parts(p)[:-1] + (base_name(path_parts(p)[-1]),)) for p, _ in flat
                   if path_parts(p)[-1].endswith(A_SUFFIX)})


def trainable_split(tree: dict) -> tuple[dict, dict]:
    """(trainable, frozen) parts of the adapted model's tree: the adapters, plus a reward model's scalar head, which
    starts fresh and must train (what PEFT's `modules_to_save` does for a sequence-classification head)."""
    adapters, base = split_adapters(tree)
    if SCORE in base:
        base = dict(base)
        adapters = dict(adapters) | {SCORE: base.pop(SCORE)}
    return adapters, base


def _abstract_adapters(cfg: Config, spec: LoraSpec) -> dict:
    model = Decoder(cfg.model, lora=spec)
    full = jax.eval_shape(lambda r: init_params(model, r, cfg.data.seq_len), jax.random.key(0))
    return trainable_split(full)


def check_targets(cfg: Config, spec: LoraSpec, adapters: Any) -> None:
    """Every `lora.targets` entry must select at least one projection; otherwise one line listing what exists."""
    paths = adapted_paths(adapters)
    experts = [p for p in paths if selection_path(p) != p]
    if experts and spec.dropout > 0:
        raise ConfigError(f"lora.dropout={spec.dropout} cannot apply to routed expert adapters ({experts[0]}: they are "
                          "folded into the expert weights, as PEFT's target_parameters); set lora.dropout=0 or drop "
                          "expert_* from lora.targets")
    for t in spec.targets:
        if not any(spec.matches(t, p) for p in paths):
            every = [selection_path(p) for p in adapted_paths(_abstract_adapters(cfg, LoraSpec(1, 1.0, (".",)))[0])]
            names = sorted({p.rsplit("/", 1)[-1] for p in every}, key=PROJECTION_NAMES.index)
            raise ConfigError(f"lora.targets: {t!r} matches no projection of this model; valid names: "
                              f"{', '.join(names)}; weight paths for patterns: {', '.join(every[:12])}"
                              f"{' ...' if len(every) > 12 else ''}")


def base_dtype(cfg: Config) -> jnp.dtype:
    return jnp.dtype(cfg.lora.base_dtype or cfg.model.param_dtype)


def lora_trees(cfg: Config, spec: LoraSpec) -> tuple[dict, dict]:
    """Boxed abstract (adapters, base) of the adapted model; the base in `lora.base_dtype`."""
    adapters, base = _abstract_adapters(cfg, spec)
    check_targets(cfg, spec, adapters)
    dtype = base_dtype(cfg)
    base = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), base)
    return adapters, base


def lora_layout(cfg: Config, model: Decoder, tx: Any, mesh: jax.sharding.Mesh, rules: LogicalRules,
                objective_frozen: Any = None) -> StateLayout:
    """The train state's layout with the adapters as `params` and `LoraFrozen(base, objective_frozen)` frozen."""
    adapters, base = lora_trees(cfg, model.lora)
    return state_layout(cfg, model, tx, mesh, rules, frozen=LoraFrozen(base=base, objective=objective_frozen),
                        params=adapters)


def lora_loss(inner: LossFn, base_is_reference: bool = False) -> LossFn:
    """Wraps an objective's loss: gradients are taken with respect to the adapters only (the step
    differentiates `params`), the base reaches the model through the joined tree and never gets a gradient.

    With `base_is_reference` the objective's frozen tree is the base itself (the plain model's tree: no adapter
    leaves, so the decoder runs without them), i.e. a DPO reference that costs no second copy of the weights
    (TRL disables the adapter for the reference pass; Tunix shares the backbone)."""

    def loss_fn(adapters: Any, batch: Any, rng: jax.Array, frozen: LoraFrozen) -> tuple[jax.Array, Any]:
        objective_frozen = frozen.base if base_is_reference else frozen.objective
        return inner(join(frozen.base, adapters), batch, rng, objective_frozen)

    return loss_fn


def model_params(state_or_params: Any) -> Any:
    """The model's full parameter tree from a TrainState (base and adapters joined for LoRA) or a params tree."""
    params = getattr(state_or_params, "params", state_or_params)
    frozen = getattr(state_or_params, "frozen", None)
    return join(frozen.base, params) if isinstance(frozen, LoraFrozen) else params


# ----------------------------------------------------------------------------------------------------------
# Building the state


def load_base(cfg: Config, layout: StateLayout, mesh: jax.sharding.Mesh, rules: LogicalRules) -> Any:
    """The frozen base on its shards: `load_parameters_from` (maxlm checkpoint or Hugging Face directory), else
    the plain model's seeded initialisation (the same weights a run without LoRA starts from)."""
    abstract, shardings = layout.abstract.frozen.base, layout.shardings.frozen.base
    if cfg.load_parameters_from:
        from maxlm.train.checkpoint import load_parameters_onto

        return load_parameters_onto(cfg.load_parameters_from, cfg, abstract, shardings)
    plain = Decoder(cfg.model)
    dtype = base_dtype(cfg)

    def init(r: jax.Array) -> Any:
        base = trainable_split(nn.unbox(init_params(plain, r, cfg.data.seq_len)))[1]
        return jax.tree_util.tree_map(lambda x: x.astype(dtype), base)

    with mesh_context(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(jax.random.key(cfg.seed))


def initial_adapters(cfg: Config, model: Decoder, layout: StateLayout, mesh: jax.sharding.Mesh,
                     rules: LogicalRules) -> Any:
    """Adapters from `lora.load_adapter_from` (PEFT directory or maxlm LoRA checkpoint), else A as PEFT initialises
    it and B = 0 (the model starts at the base); a reward model's head is freshly initialised with them."""
    abstract, shardings = layout.abstract.params, layout.shardings.params
    if cfg.lora.load_adapter_from:
        return load_adapters(cfg.lora.load_adapter_from, cfg, abstract, shardings)

    def init(r: jax.Array) -> Any:
        return trainable_split(nn.unbox(init_params(model, r, cfg.data.seq_len)))[0]

    with mesh_context(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(jax.random.key(cfg.seed))


def load_adapters(path: str, cfg: Config, abstract: Any, shardings: Any) -> Any:
    """Adapters from a PEFT adapter directory or a maxlm LoRA checkpoint, shapes checked first (ConfigError)."""
    with_sh = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                     shardings)
    from maxlm.convert.peft import is_peft_dir, load_peft_adapters

    if is_peft_dir(path):
        return load_peft_adapters(path, cfg, with_sh)
    step_dir, _ = resolve_step_dir(path)
    meta = read_meta(step_dir)
    if "lora" not in meta:
        raise ConfigError(f"lora.load_adapter_from={path} is a maxlm checkpoint without adapters (not a LoRA run); "
                          "give a LoRA run's checkpoint or a PEFT adapter directory")
    from maxlm.train.checkpoint import describe_mismatch

    problem = describe_mismatch("adapter", meta["params"], tree_shapes(abstract), None, {})
    if problem:
        raise ConfigError(f"lora.load_adapter_from={path}: {problem}; use the lora.rank/targets and model it was "
                          "trained with")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(str(epath.Path(step_dir) / ITEM_PARAMS), with_sh)


def init_lora_state(cfg: Config, model: Decoder, tx: Any, layout: StateLayout, mesh: jax.sharding.Mesh,
                    rules: LogicalRules, objective_frozen: Any = None) -> TrainState:
    """Step 0 of a LoRA run: adapters (fresh or imported), their optimizer state, and the frozen base."""
    frozen = LoraFrozen(base=load_base(cfg, layout, mesh, rules), objective=objective_frozen)
    adapters = initial_adapters(cfg, model, layout, mesh, rules)
    return init_state_from_params(adapters, tx, layout, mesh, rules, frozen=frozen)


def check_base_pointer(cfg: Config, meta: dict[str, Any], where: str) -> None:
    """A resumed LoRA run must train on the base its checkpoint was trained on."""
    saved = meta.get("lora")
    if saved is None:
        raise ConfigError(f"{where} holds a full model, not LoRA adapters; resume with lora.enabled=false or use "
                          "another run_dir")
    here = lora_base_pointer(cfg)
    for key in ("base", "base_dtype") + (("init_seed",) if here["base"] is None else ()):
        if saved.get(key) != here[key]:
            raise ConfigError(f"{where}: its adapters were trained on base {key}={saved.get(key)!r} but this config "
                              f"gives {here[key]!r}; set load_parameters_from/lora.base_dtype/seed as that run did")

