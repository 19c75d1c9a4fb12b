"""What decoding and evaluation need from a config: the mesh, the weights on their shards, and the tokenizer.

Weights come from `load_parameters_from` (a run directory, a maxlm checkpoint or a Hugging Face directory); when it
is empty, from the newest checkpoint under `run_dir`; with neither, the model is randomly initialised from `seed`
(a warning says so: useful for benchmarks and tests, never what a user wants to read text from).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import Mesh

from maxlm.config import Config
from maxlm.mesh import LogicalRules

log = logging.getLogger(__name__)


def load_tokenizer_for(cfg: Config) -> Any | None:
    """`data.tokenizer` (a sentencepiece .model or a Hugging Face tokenizer directory; the cache's copy when
    `data.cache_dir` is set), else the tokenizer of a Hugging Face `load_parameters_from` directory; None when
    there is none (prompts must then be given as ids)."""
    from maxlm.data.hf_tokenizer import load_text_tokenizer
    from maxlm.data.pipeline import tokenizer_path

    path = tokenizer_path(cfg.data)
    if not path and cfg.load_parameters_from and os.path.isfile(os.path.join(cfg.load_parameters_from,
                                                                             "tokenizer.json")):
        path = cfg.load_parameters_from
    return load_text_tokenizer(path) if path else None


# Chat templates end an assistant turn with one of these; decoding a conversation stops there as at eos.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def stop_ids(cfg: Config, tokenizer: Any | None) -> tuple[int, ...]:
    """Ids that end a completion: the tokenizer's eos, its end-of-turn markers, and the `eos_token_id` (one or a
    list, as Llama 3 has) of a Hugging Face model directory's generation_config.json / config.json."""
    ids: set[int] = set()
    if tokenizer is not None:
        ids |= {i for i in [tokenizer.eos_id] + [tokenizer.token_id(t) for t in END_OF_TURN] if i is not None}
    src = cfg.load_parameters_from
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(src, name) if src else ""
        if path and os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            ids |= set(eos) if isinstance(eos, list) else {eos} if isinstance(eos, int) else set()
    return tuple(sorted(ids))


@dataclass
class LoadedModel:
    """A model ready to decode or score: its config, mesh, rules and parameters (on their shards)."""

    cfg: Config
    mesh: Mesh
    rules: LogicalRules
    params: Any
    source: str  # where the weights came from ("" for a random init)


def weights_source(cfg: Config) -> str:
    """`load_parameters_from`, else `run_dir` when it holds checkpoints, else "" (random init)."""
    if cfg.load_parameters_from:
        return cfg.load_parameters_from
    ckpt = os.path.join(cfg.run_dir, "checkpoints")
    if os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt)):
        return cfg.run_dir
    return ""


def load_model(cfg: Config) -> LoadedModel:
    """Validates the config, builds the mesh and reads the weights straight onto their shards."""
    from maxlm.train.builder import build_core
    from maxlm.train.checkpoint import load_parameters
    from maxlm.train.state import init_state

    # Decoding pads its own batches, so the training batch need not divide this machine's data-parallel size.
    inference = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, global_batch_size=jax.device_count() * 8, grad_accum=1))
    core = build_core(inference)
    source = weights_source(cfg)
    if source:
        params = load_parameters(source, cfg, core.layout)
    else:
        log.warning("no weights: load_parameters_from is empty and %s has no checkpoints; using a random "
                    "initialisation (seed %d)", cfg.run_dir, cfg.seed)
        params = init_state(cfg, core.model, core.tx, core.layout, core.mesh, core.rules,
                            jax.random.key(cfg.seed)).params
    return LoadedModel(cfg, core.mesh, core.rules, params, source)
