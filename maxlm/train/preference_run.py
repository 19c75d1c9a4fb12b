"""What a preference run (train.objective dpo | reward) adds to the run builder: its data, its reference model,
and a reward model's fresh head.

  * data: the tokenized groups of whole pairs (maxlm.data.preference), sliced per host, batched as
    `PreferenceBatch`es; with `dpo.reference: precomputed` the reference pass fills their reference log-probs first.
  * frozen reference: `TrainState.frozen`, laid out with the parameters' own shardings, rebuilt from its source
    (`dpo.reference_from`, else the starting weights) on every start, resumed or not, so checkpoints never hold it.
  * reward models from a causal LM (an SFT checkpoint or an HF `LlamaForCausalLM` directory): the backbone is
    loaded, the `score` head initialised fresh.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator

import flax.linen as nn
import jax
from jax.sharding import Mesh

from maxlm.config import Config, ConfigError
from maxlm.mesh import LogicalRules, mesh_context
from maxlm.model import Decoder
from maxlm.model.heads import SCORE
from maxlm.train.batch import global_batch
from maxlm.train.preference_batch import PreferenceBatch
from maxlm.train.reference import attach_precomputed, ensure_same_shapes, reference_source, uses_frozen
from maxlm.train.state import StateLayout, sharded_layout
from maxlm.train.state import init_params as init_params_boxed

log = logging.getLogger(__name__)


def frozen_abstract(cfg: Config) -> Any:
    """The boxed abstract tree of the frozen reference (the plain model's shapes and logical axes: a reference has
    no LoRA adapters), or None when the run has no frozen reference."""
    if not uses_frozen(cfg):
        return None
    return jax.eval_shape(lambda r: init_params_boxed(Decoder(cfg.model), r, cfg.data.seq_len), jax.random.key(0))


def reference_layout(cfg: Config, model: nn.Module, layout: StateLayout, mesh: Mesh, rules: LogicalRules
                     ) -> tuple[nn.Module, StateLayout]:
    """The model and a layout whose `params` are the reference's. Without LoRA that is the run's own; with LoRA the
    state's `params` are the adapters, so the reference (a full model without adapters) gets the plain model's
    tree, sharded by the same rules."""
    if not cfg.lora.enabled:
        return model, layout
    plain = Decoder(cfg.model)
    boxed = jax.eval_shape(lambda r: init_params_boxed(plain, r, cfg.data.seq_len), jax.random.key(0))
    abstract, logical, shardings = sharded_layout(boxed, mesh, rules)
    return plain, StateLayout(abstract=layout.abstract.replace(params=abstract), logical=logical,
                              shardings=layout.shardings.replace(params=shardings))


def init_params(cfg: Config, model: nn.Module, layout: StateLayout, mesh: Mesh, rules: LogicalRules) -> Any:
    """The seeded initial parameters alone (what init_state would start from), on their shards."""
    with mesh_context(mesh, rules):
        return jax.jit(lambda r: nn.unbox(init_params_boxed(model, r, cfg.data.seq_len)),
                       out_shardings=layout.shardings.params)(jax.random.key(cfg.seed))


def _source_has_score(path: str) -> bool:
    from maxlm.convert.families import read_hf_config
    from maxlm.convert.hf import is_hf_dir
    from maxlm.convert.params_store import model_config_from_meta
    from maxlm.checkpoint_format import read_meta, resolve_step_dir

    if is_hf_dir(path):
        return "LlamaForSequenceClassification" in (read_hf_config(path).get("architectures") or [])
    return model_config_from_meta(read_meta(resolve_step_dir(path)[0])).head == "scalar"


def load_start_params(path: str, cfg: Config, model: nn.Module, layout: StateLayout, mesh: Mesh,
                      rules: LogicalRules) -> Any:
    """`load_parameters_from` for any objective; a reward model started from a causal LM gets the backbone from
    `path` and a freshly initialised `score` head."""
    from maxlm.train.checkpoint import _with_shardings, load_parameters

    if cfg.model.head != "scalar" or _source_has_score(path):
        return load_parameters(path, cfg, layout)
    from maxlm.convert.hf import is_hf_dir, load_hf_params
    from maxlm.convert.layout import assemble_params
    from maxlm.convert.params_store import CheckpointUnitSource
    from maxlm.checkpoint_format import resolve_step_dir

    backbone_cfg = dataclasses.replace(cfg.model, head="lm")
    abstract = _with_shardings(layout.abstract.params, layout.shardings.params)
    body = {k: v for k, v in abstract.items() if k != SCORE}
    if is_hf_dir(path):
        params = load_hf_params(path, backbone_cfg, body)
    else:
        params = assemble_params(CheckpointUnitSource(resolve_step_dir(path)[0]), backbone_cfg, body,
                                 where=f"load_parameters_from={path}")
    log.info("reward model: backbone from %s, a fresh %s head", path, SCORE)
    return dict(params) | {SCORE: init_params(cfg, model, layout, mesh, rules)[SCORE]}


def reference_params(cfg: Config, model: nn.Module, layout: StateLayout, mesh: Mesh, rules: LogicalRules) -> Any:
    """The reference weights on the parameters' shards: `dpo.reference_from`, else the run's starting weights
    (with LoRA: the base, in the model's parameter dtype)."""
    model, layout = reference_layout(cfg, model, layout, mesh, rules)
    src = reference_source(cfg)
    if not src:
        return init_params(cfg, model, layout, mesh, rules)
    where = "dpo.reference_from" if cfg.dpo.reference_from else "load_parameters_from"
    if cfg.dpo.reference_from:
        _check_reference_shapes(src, cfg, layout, where)
    return load_start_params(src, cfg, model, layout, mesh, rules)


def _check_reference_shapes(src: str, cfg: Config, layout: StateLayout, where: str) -> None:
    """A reference of another shape is refused in one line before anything is read."""
    from maxlm.convert.families import model_config_from_hf, read_hf_config
    from maxlm.convert.hf import is_hf_dir
    from maxlm.convert.params_store import model_config_from_meta
    from maxlm.model import abstract_params
    from maxlm.checkpoint_format import read_meta, resolve_step_dir

    try:
        other = (model_config_from_hf(read_hf_config(src), cfg.model) if is_hf_dir(src)
                 else model_config_from_meta(read_meta(resolve_step_dir(src)[0])))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    other = dataclasses.replace(other, scan_layers=cfg.model.scan_layers, param_dtype=cfg.model.param_dtype)
    ensure_same_shapes(layout.abstract.params, nn.unbox(abstract_params(other)), f"{where}={src}")


def preference_stream(cfg: Config, model: nn.Module, layout: StateLayout, mesh: Mesh, rules: LogicalRules,
                      bsh: Any, shard_index: int, shard_count: int) -> tuple[Any, Iterator[PreferenceBatch]]:
    """(the resumable grain iterator, global PreferenceBatches) for this host."""
    from maxlm.data.preference import groups_fingerprint, load_preference_groups, preference_batches

    groups, cache_path, _ = load_preference_groups(cfg.data, cfg.model.vocab_size,
                                                   os.path.join(cfg.run_dir, "preference"))
    local_batch = cfg.train.global_batch_size // shard_count
    if cfg.train.objective == "dpo" and cfg.dpo.reference == "precomputed":
        def to_device(chunk: dict) -> PreferenceBatch:  # this host's contiguous block of the global rows
            lo, hi = (len(chunk["pair_mask"]) * i // shard_count for i in (shard_index, shard_index + 1))
            return global_batch(PreferenceBatch, {k: v[lo:hi] for k, v in chunk.items()}, bsh)

        def run_reference() -> Any:
            return reference_params(cfg, model, layout, mesh, rules)

        with mesh_context(mesh, rules):
            # Every host computes every group (the pass is one forward over the data; simple and deterministic).
            path = attach_precomputed(cfg, model, run_reference, groups, cache_path, groups_fingerprint(groups),
                                      PreferenceBatch, to_device, cfg.train.global_batch_size)
        log.info("reference log-probs: %s", os.path.basename(path))
    data_iter = iter(preference_batches(groups, batch_size=local_batch, seed=cfg.seed + cfg.data.shuffle_seed,
                                        shard_index=shard_index, shard_count=shard_count))
    return data_iter, (global_batch(PreferenceBatch, b, bsh) for b in data_iter)
