"""Scoring (prompt, response) pairs with a trained reward model (`maxlm reward score`).

Each sequence is [bos] + prompt + response + [eos] (the layout reward training saw), right-padded to a bucket
length (a multiple of 64, so a file of mixed lengths compiles a handful of shapes), and scored by the scalar head at
its last real token, exactly as in training and as Hugging Face's LlamaForSequenceClassification pools.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxlm.config import ConfigError, ModelConfig
from maxlm.model import Decoder, abstract_params
from maxlm.model.heads import SCORE, ScalarHead, gather_last, segment_last_index

BUCKET = 64


def load_reward_model(checkpoint: str) -> tuple[ModelConfig, Any, dict]:
    """(model config, parameters on the default device, the checkpoint's saved config) of a reward checkpoint; a
    LoRA run's checkpoint is merged into its base first (maxlm.convert.lora_merge, into a temporary directory)."""
    import orbax.checkpoint as ocp

    from maxlm.convert.params_store import model_config_from_meta
    from maxlm.checkpoint_format import read_meta, resolve_step_dir

    step_dir, _ = resolve_step_dir(checkpoint)
    meta = read_meta(step_dir)
    if "lora" in meta:
        import tempfile

        from maxlm.convert.lora_merge import merge_checkpoint

        with tempfile.TemporaryDirectory(prefix="maxlm-reward-") as tmp:
            model_cfg, params, _ = load_reward_model(merge_checkpoint(step_dir, tmp))
            return model_cfg, params, meta.get("config") or {}
    model_cfg = model_config_from_meta(meta)
    if model_cfg.head != "scalar":
        raise ConfigError(f"{checkpoint} is not a reward model (model.head={model_cfg.head}); train one with "
                          "train.objective=reward model.head=scalar")
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(os.path.join(step_dir, "params"), nn.unbox(abstract_params(model_cfg)))
    return model_cfg, params, meta.get("config") or {}


def score_sequences(model_cfg: ModelConfig, params: Any, sequences: Iterable[list[int]], batch_size: int = 16
                    ) -> list[float]:
    """One score per token sequence."""
    model = Decoder(model_cfg)

    @jax.jit
    def run(p: Any, ids_BT: jax.Array, seg_BT: jax.Array) -> jax.Array:
        x_BTD = model.apply({"params": p}, ids_BT, seg_BT)
        last_B1 = segment_last_index(seg_BT, 1)
        return ScalarHead(model_cfg).apply({"params": p[SCORE]}, gather_last(x_BTD, last_B1))[:, 0]

    seqs = list(sequences)
    out: list[float] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        length = -(-max(len(s) for s in chunk) // BUCKET) * BUCKET
        ids = np.zeros((batch_size, length), np.int32)
        seg = np.zeros((batch_size, length), np.int32)
        for i, s in enumerate(chunk):
            ids[i, :len(s)], seg[i, :len(s)] = s, 1
        seg[len(chunk):, 0] = 1  # filler rows: one token, ignored
        scores = np.asarray(run(params, jnp.asarray(ids), jnp.asarray(seg)))
        out.extend(float(x) for x in scores[:len(chunk)])
    return out
