"""Held-out evaluation: loss and bits per byte on the documents `data.eval_fraction` keeps out of training.

The eval batches are read once, when the evaluator is made, and kept as global arrays, so every evaluation
scores exactly the same tokens (curves are comparable across steps and runs with the same data config) and no
data pipeline runs during training. Each host holds only its share of the held-out documents, like training.

Bits per byte = (summed next-token cross-entropy in nats) / ln 2 / (UTF-8 bytes of the target tokens). The byte
count comes from the tokenizer's per-id byte table (maxlm.data.tokenizer.Tokenizer.token_bytes), which sums to
exactly `len(text.encode())` over a document's ids; it is tokenizer-independent, unlike the loss per token, so
models with different vocabularies compare on it. Synthetic data has no bytes: only `eval_loss` is reported.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from maxlm.config import Config
from maxlm.mesh import LogicalRules, mesh_context, process_rows, replicated
from maxlm.train.batch import LmBatch, batch_shardings, global_batch, local_batch
from maxlm.train.lora_state import model_params
from maxlm.train.losses import make_pretrain_loss

Evaluator = Callable[[Any], dict[str, float]]


def _token_bytes(cfg: Config) -> np.ndarray | None:
    from maxlm.data.pipeline import tokenizer_path
    from maxlm.config.data_spec import components
    from maxlm.data.tokenizer import load_tokenizer

    path = tokenizer_path(cfg.data)
    if not any(c.needs_files for c in components(cfg.data)) or not path or not os.path.isfile(path):
        return None
    table = load_tokenizer(path).token_bytes()
    return np.pad(table, (0, max(0, cfg.model.vocab_size - len(table)))).astype(np.float32)


def make_evaluator(cfg: Config, mesh: Mesh, rules: LogicalRules, model: Any, split: str = "eval"
                   ) -> Evaluator | None:
    """`evaluate(state_or_params) -> {"loss", "bits_per_byte", "tokens"}` over `train.eval_steps` batches of the
    held-out split (rows per batch: global_batch_size / grad_accum, i.e. one training microbatch), or None when
    `train.eval_every` is 0. `split="train"` scores the training split instead (`maxlm eval --task loss` on a
    dataset without a held-out part). The loop logs the keys with an `eval_` prefix (eval_loss, eval_bits_per_byte).
    Call it on every process: scoring is a collective over the global batch."""
    if cfg.train.eval_every <= 0 or cfg.train.eval_steps <= 0:
        return None
    from maxlm.data.shards import ProcessBatches

    table = _token_bytes(cfg)
    shardings = batch_shardings(LmBatch, mesh, rules)
    rows = cfg.micro_batch_size
    # Read once and kept: every evaluation scores exactly the same tokens, the same on any number of processes.
    it = ProcessBatches(dataclasses.replace(cfg.data, num_workers=0, stage_starts=[]), vocab_size=cfg.model.vocab_size,
                        global_batch_size=rows, rows=process_rows(shardings.inputs, rows), seed=cfg.seed,
                        process_index=jax.process_index(), process_count=jax.process_count(), split=split)
    try:
        local = [next(it) for _ in range(cfg.train.eval_steps)]
    finally:
        it.close()
    # Each batch with the UTF-8 bytes of its trained target tokens (for bits per byte), summed on the host.
    typed = [local_batch(LmBatch, b) for b in local]
    batches = [(global_batch(LmBatch, vars(b), shardings),
                float(np.sum(table[b.targets] * b.targets_weights)) if table is not None else 0.0) for b in typed]
    # Router jitter is training noise: without it (no "router" rng reaches the model) eval is deterministic.
    # LoRA dropout likewise (its rng is only passed when lora.dropout > 0).
    no_jitter = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, router_jitter=0.0),
                                    lora=dataclasses.replace(cfg.lora, dropout=0.0))
    loss_fn = make_pretrain_loss(no_jitter, model)

    def score(params: Any, batch: LmBatch) -> dict[str, jax.Array]:
        _, metrics = loss_fn(params, batch, jax.random.key(0), None)
        return {"nats": metrics["ce"] * metrics["weight"], "tokens": metrics["weight"]}

    scored = jax.jit(score, out_shardings=replicated(mesh))

    def evaluate(state_or_params: Any) -> dict[str, float]:
        params = model_params(state_or_params)  # a TrainState (LoRA: base and adapters joined) or params
        with mesh_context(mesh, rules):
            parts = [scored(params, b) for b, _ in batches]
        total = jax.device_get(jax.tree_util.tree_map(lambda *x: sum(x), *parts))
        nats, tokens, nbytes = float(total["nats"]), float(total["tokens"]), sum(n for _, n in batches)
        out = {"loss": nats / max(tokens, 1.0), "tokens": tokens}
        if table is not None and nbytes > 0:
            out["bits_per_byte"] = nats / math.log(2) / nbytes
        return out

    return evaluate
