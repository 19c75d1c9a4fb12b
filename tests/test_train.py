"""The train step and loop: sharding must not change the math, accumulation is exact, the loss falls."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from maxlm.mesh import build_mesh, logical_rules, mesh_context
from maxlm.train.batch import LmBatch, batch_shardings, global_batch
from maxlm.model import Decoder
from maxlm.train.loop import train
from maxlm.train.objectives import OBJECTIVES
from maxlm.train.metrics import read_metrics
from maxlm.train.optimizer import decay_mask, lr_schedule, make_optimizer
from maxlm.train.state import init_state, state_layout
from maxlm.train.step import grads_and_metrics

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]  # pure data, pure fsdp, all three axes


def test_sharding_does_not_change_the_losses(tmp_path) -> None:
    losses = {}
    for d, f, t in MESHES:
        cfg = tiny_config(f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}", "train.steps=5", "train.log_every=1",
                          f"run_dir={tmp_path}/{d}{f}{t}")
        summary = train(cfg, progress=False)
        losses[(d, f, t)] = np.array([loss for _, loss in summary["losses"]])
        assert len(losses[(d, f, t)]) == 5
    ref = losses[MESHES[0]]
    assert ref[-1] < ref[0]
    for mesh, got in losses.items():
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=f"mesh {mesh}")


def _grads(cfg, batch):
    """Loss metrics and gradients of one global batch, with cfg.train.grad_accum microbatches, on the mesh."""
    mesh, rules = build_mesh(cfg), logical_rules(cfg)
    model = Decoder(cfg.model)
    tx, _ = make_optimizer(cfg)
    layout = state_layout(cfg, model, tx, mesh, rules)
    state = init_state(cfg, model, tx, layout, mesh, rules, jax.random.key(0))
    bsh = batch_shardings(LmBatch, mesh, rules)
    loss_fn = OBJECTIVES["pretrain"].make_loss(cfg, model)
    fn = jax.jit(lambda p, b: grads_and_metrics(loss_fn, p, b, jax.random.key(1), cfg.train.grad_accum, bsh))
    with mesh_context(mesh, rules):
        return jax.device_get(fn(state.params, global_batch(LmBatch, batch, bsh)))


@pytest.mark.parametrize("k", [2, 4])
def test_microbatches_equal_one_big_step(k: int) -> None:
    """k microbatches of b rows == one step on all k*b rows, even when rows carry different token counts."""
    batch = random_batch(16, 64, 256, seed=3, docs_per_row=2)
    batch["targets_weights"][:5, 20:] = 0.0  # uneven weights: a mean of microbatch means would be wrong
    g1, m1 = _grads(tiny_config("train.grad_accum=1"), batch)
    gk, mk = _grads(tiny_config(f"train.grad_accum={k}"), batch)
    np.testing.assert_allclose(mk["loss"], m1["loss"], rtol=1e-6)
    assert mk["weight"] == m1["weight"] == batch["targets_weights"].sum()
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(gk)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # The naive alternative (mean of per-microbatch means) differs measurably: the test can fail.
    micro_losses = [_grads(tiny_config("train.global_batch_size=8"), {n: v[i::2] for n, v in batch.items()})[1]["loss"]
                    for i in range(2)]
    assert abs(np.mean(micro_losses) - m1["loss"]) > 1e-4


def test_schedules() -> None:
    cfg = tiny_config("optim.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1", "train.steps=110")
    s = lr_schedule(cfg.optim, cfg.train.steps)
    assert float(s(0)) == pytest.approx(0.1) and float(s(9)) == pytest.approx(1.0)
    assert float(s(109)) == pytest.approx(0.1, abs=1e-3)
    wsd = tiny_config("optim.lr=1.0", "optim.warmup_steps=10", "optim.schedule=wsd", "optim.decay_fraction=0.2",
                      "optim.min_lr_ratio=0.0", "train.steps=110")
    w = lr_schedule(wsd.optim, wsd.train.steps)
    assert float(w(50)) == pytest.approx(1.0) and float(w(89)) == pytest.approx(1.0)
    assert float(w(100)) == pytest.approx(0.5, abs=0.06) and float(w(110)) == pytest.approx(0.0, abs=1e-6)


def test_weight_decay_mask_skips_norms_and_embeddings() -> None:
    cfg = tiny_config()
    params = {"embed": {"embedding": 1}, "layers": {"attn_norm": {"scale": 1}, "mlp": {"up": 1}}, "lm_head": 1}
    mask = decay_mask(cfg.optim, params)
    assert mask == {"embed": {"embedding": False}, "layers": {"attn_norm": {"scale": False}, "mlp": {"up": True}},
                    "lm_head": True}


def test_train_writes_metrics_and_tensorboard(tmp_path) -> None:
    cfg = tiny_config("train.steps=6", "train.log_every=3", f"run_dir={tmp_path}", "train.z_loss=1e-4")
    train(cfg, progress=False)
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 3, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tflops_per_device", "mfu", "z_loss"):
        assert key in rows[-1]
    assert rows[-1]["mfu"] is None  # CPU: no peak in the table
    assert rows[-1]["loss"] > rows[-1]["ce"]  # the z-loss term is included
    assert (tmp_path / "config.yaml").exists()
    assert list((tmp_path / "tensorboard").iterdir())


def test_same_seed_same_losses(tmp_path) -> None:
    a = train(tiny_config("train.steps=3", "train.log_every=1", f"run_dir={tmp_path}/a"), progress=False)
    b = train(tiny_config("train.steps=3", "train.log_every=1", f"run_dir={tmp_path}/b"), progress=False)
    assert a["losses"] == b["losses"]


def test_eval_every_logs_eval_loss(tmp_path) -> None:
    cfg = tiny_config("train.steps=4", "train.log_every=2", "train.eval_every=2", "train.eval_steps=2",
                      f"run_dir={tmp_path}")
    train(cfg, progress=False)
    evals = [r for r in read_metrics(str(tmp_path)) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]  # the held-out batches are fixed: training lowers it
