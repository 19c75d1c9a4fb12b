"""What decoding and evaluation need from a config: the mesh, the weights on their shards, and the tokenizer.

Weights come from `load_parameters_from` (a run directory, a maxlm checkpoint or a Hugging Face directory); when it
is empty, from the newest checkpoint under `run_dir`; with neither, the model is randomly initialised from `seed`
(a warning says so: useful for benchmarks and tests, never what a user wants to read text from).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jax
from jax.sharding import Mesh

from maxlm.config import Config, ConfigError, validate
from maxlm.mesh import LogicalRules, build_mesh, logical_rules
from maxlm.model import Decoder

log = logging.getLogger(__name__)


class TextTokenizer(Protocol):
    """The calls decoding needs: text <-> ids and the special ids."""

    bos_id: int | None
    eos_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceText:
    """maxlm's own tokenizer (maxlm.data.tokenizer): bos/eos are its fixed special ids."""

    def __init__(self, path: str) -> None:
        from maxlm.data.tokenizer import load_tokenizer

        self._tok = load_tokenizer(path)
        self.bos_id: int | None = self._tok.bos_id
        self.eos_ids = (self._tok.eos_id,)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids)


class HFText:
    """A Hugging Face `tokenizer.json` (via `tokenizers`), with bos/eos read from the directory's configs."""

    def __init__(self, directory: str) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
        model_cfg = _read_json(os.path.join(directory, "config.json")) | _read_json(
            os.path.join(directory, "generation_config.json"))

        def token_id(key: str) -> int | None:
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return self._tok.token_to_id(tok) if isinstance(tok, str) else None

        eos = model_cfg.get(f"eos_token_id")
        eos_ids = list(eos) if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        if token_id("eos_token") is not None:
            eos_ids.append(token_id("eos_token"))
        self.eos_ids = tuple(sorted(set(eos_ids)))
        bos = model_cfg.get("bos_token_id")
        self.bos_id = bos if isinstance(bos, int) else token_id("bos_token")
        self.chat_template: str | None = cfg.get("chat_template")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_text_tokenizer(cfg: Config) -> TextTokenizer | None:
    """`data.tokenizer` (a sentencepiece .model, or a directory / tokenizer.json of Hugging Face's format), the
    cache's copy when `data.cache_dir` is set, else the `tokenizer.json` of a Hugging Face `load_parameters_from`;
    None when there is none (prompts must then be given as ids)."""
    from maxlm.data.pipeline import tokenizer_path

    path = tokenizer_path(cfg.data)
    if not path and cfg.load_parameters_from and os.path.isfile(os.path.join(cfg.load_parameters_from,
                                                                             "tokenizer.json")):
        path = cfg.load_parameters_from
    if not path:
        return None
    if os.path.isdir(path) or path.endswith("tokenizer.json"):
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
            raise ConfigError(f"data.tokenizer={path}: no tokenizer.json there")
        return HFText(directory)
    return SentencePieceText(path)


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
    validate_for_inference(cfg)
    from maxlm.train.checkpoint import load_parameters
    from maxlm.train.optimizer import make_optimizer
    from maxlm.train.state import init_state, state_layout

    mesh, rules = build_mesh(cfg), logical_rules(cfg)
    model = Decoder(cfg.model)
    tx, _ = make_optimizer(cfg)
    layout = state_layout(cfg, model, tx, mesh, rules)
    source = weights_source(cfg)
    if source:
        params = load_parameters(source, cfg, layout)
    else:
        log.warning("no weights: load_parameters_from is empty and %s has no checkpoints; using a random "
                    "initialisation (seed %d)", cfg.run_dir, cfg.seed)
        params = init_state(cfg, model, tx, layout, mesh, rules, jax.random.key(cfg.seed)).params
    return LoadedModel(cfg, mesh, rules, params, source)


def validate_for_inference(cfg: Config) -> None:
    """`validate` without the training batch's divisibility (decoding pads its own batches)."""
    import dataclasses

    dp_free = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=jax.device_count() * 8,
                                                                 grad_accum=1))
    validate(dp_free, jax.device_count())
