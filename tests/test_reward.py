"""Reward models: the Bradley-Terry loss on packed rows equals per-sequence scoring, and a Hugging Face
`LlamaForSequenceClassification` converts both ways with identical scores and bit-identical weights."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import tiny_config
from maxlm.convert.hf import from_hf, to_hf
from maxlm.convert.params_store import model_config_from_meta
from maxlm.convert.safetensors_io import SafetensorsReader
from maxlm.data.preference import pack_pairs
from maxlm.model import Decoder, abstract_params
from maxlm.model.heads import SCORE, ScalarHead, init_head_params
from maxlm.checkpoint_format import read_meta
from maxlm.train.preference_batch import preference_batch
from maxlm.train.reward import make_reward_loss
from test_preference_data import random_pairs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def score_one(model_cfg, params, ids: list[int]) -> float:
    """The score of one unpacked, unpadded sequence: the head on its last hidden state."""

    @jax.jit
    def score(p, ids_1T):
        x = Decoder(model_cfg).apply({"params": p}, ids_1T)
        return ScalarHead(model_cfg).apply({"params": p[SCORE]}, x[0, -1])

    return float(score(params, jnp.asarray([ids])))


def test_reward_loss_scores_each_sequence_at_its_last_token():
    cfg = tiny_config("model.head=scalar", "train.objective=reward", "reward.center_rewards_coef=0.05")
    model = Decoder(cfg.model)
    rng = jax.random.key(0)
    params = nn.unbox(model.init(rng, np.zeros((1, 8), np.int32))["params"] | init_head_params(cfg.model, rng))
    params[SCORE]["kernel"] = params[SCORE]["kernel"] * 50  # scores of order 1
    pairs = random_pairs(6, seed=2)
    for i, p in enumerate(pairs):
        p.margin = 0.1 * i
    want = []
    for p in pairs:
        rc, rr = score_one(cfg.model, params, p.prompt + p.chosen), score_one(cfg.model, params, p.prompt + p.rejected)
        want.append((np.logaddexp(0, -(rc - rr - p.margin)) + 0.05 * (rc + rr) ** 2, rc > rr, rc - rr))
    want = np.asarray(want, np.float64)
    for packed in (True, False):
        batch = preference_batch(pack_pairs(pairs, 64, 4, packed))
        loss, m = jax.jit(make_reward_loss(cfg, model))(params, batch, None)
        assert float(m["weight"]) == 6
        np.testing.assert_allclose(float(loss), want[:, 0].mean(), rtol=1e-5)
        np.testing.assert_allclose(float(m["accuracy"]), want[:, 1].mean(), rtol=1e-6)
        np.testing.assert_allclose(float(m["margin"]), want[:, 2].mean(), rtol=1e-5, atol=1e-6)


def test_hf_sequence_classification_round_trip(tmp_path: Path):
    hf_cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, num_labels=1,
                                      pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    step_dir, cfg = from_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert cfg.model.head == "scalar"
    model_cfg = model_config_from_meta(read_meta(step_dir))
    params = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "params"),
                                                nn.unbox(abstract_params(model_cfg)))
    ids = np.random.RandomState(0).randint(1, 96, size=(3, 20))
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits[:, 0].numpy()
    got = [score_one(model_cfg, params, list(row)) for row in ids]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    to_hf(step_dir, str(tmp_path / "hf2"))
    first, second = SafetensorsReader(str(tmp_path / "hf")), SafetensorsReader(str(tmp_path / "hf2"))
    assert first.keys() == second.keys() and "score.weight" in first.keys() and "lm_head.weight" not in first.keys()
    for name in first.keys():
        np.testing.assert_array_equal(first.read(name), second.read(name))
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf2").eval()
    assert type(back).__name__ == "LlamaForSequenceClassification"
