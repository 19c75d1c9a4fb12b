"""LoRA: step 0 is the base model, merged == unmerged, only adapters train (and only they have optimizer state),
adapters are sharded like their base weight, losses do not depend on the mesh, resume is exact, bad input exits 2."""

from __future__ import annotations

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from maxlm.cli import main as cli_main
from maxlm.model import Decoder
from maxlm.model.lora import A_SUFFIX, B_SUFFIX, merge_adapters
from maxlm.train.batch import LmBatch, global_batch
from maxlm.train.builder import build_core, initial_state
from maxlm.train.lora_state import LoraFrozen, model_params
from maxlm.train.loop import train
from maxlm.train.metrics import read_metrics
from maxlm.treepath import path_parts

LORA = ("lora.enabled=true", "lora.rank=4", "lora.alpha=8")
IDS = np.random.RandomState(0).randint(0, 256, size=(2, 16))


def logits(model_cfg, params, ids=IDS, lora=None) -> np.ndarray:
    fn = jax.jit(lambda p, x: Decoder(model_cfg, lora=lora).apply({"params": p}, x))
    return np.asarray(fn(jax.device_get(params), jnp.asarray(ids)))


@pytest.fixture(scope="module")
def core_state():
    cfg = tiny_config(*LORA, "lora.targets=[q, v, o, down]", "optim.schedule=constant", "optim.warmup_steps=0")
    core = build_core(cfg)
    return cfg, core, initial_state(core)


def test_step_zero_is_the_base_and_adapters_start_as_peft_does(core_state) -> None:
    cfg, core, state = core_state
    assert isinstance(state.frozen, LoraFrozen)
    base = jax.device_get(state.frozen.base)
    np.testing.assert_array_equal(logits(cfg.model, model_params(state), lora=core.model.lora),
                                  logits(cfg.model, base))
    adapters = jax.device_get(state.params)
    attn, mlp = adapters["layers"]["attn"], adapters["layers"]["mlp"]
    assert set(attn) == {"q_lora_a", "q_lora_b", "v_lora_a", "v_lora_b", "o_lora_a", "o_lora_b"}
    assert set(mlp) == {"down_lora_a", "down_lora_b"}
    # A ~ U(-1/sqrt(in), 1/sqrt(in)) with `in` the product of the input dims (o: heads x head_dim); B = 0.
    for a, fan_in in [(attn["q_lora_a"], 64), (attn["o_lora_a"], 4 * 16), (mlp["down_lora_a"], 128)]:
        assert np.abs(a).max() <= 1 / np.sqrt(fan_in) and np.abs(a).max() > 0.8 / np.sqrt(fan_in)
    assert attn["o_lora_a"].shape == (2, 4, 16, 4) and attn["q_lora_b"].shape == (2, 4, 4, 16)
    assert all(not np.any(b) for k, b in {**attn, **mlp}.items() if k.endswith(B_SUFFIX))


def test_adapters_are_sharded_like_their_base_weight(core_state) -> None:
    _, core, state = core_state
    sh = core.layout.shardings
    base_attn, ad_attn = sh.frozen.base["layers"]["attn"], sh.params["layers"]["attn"]
    # q [L, D, N, H]: input D (fsdp), outputs N, H (tensor, none); o [L, N, H, D]: inputs N, H, output D.
    assert tuple(base_attn["q"].spec) == (None, "fsdp", "tensor", None)
    assert tuple(ad_attn["q_lora_a"].spec)[:2] == (None, "fsdp") and tuple(ad_attn["q_lora_b"].spec)[2:] == (
        "tensor", None)
    assert tuple(ad_attn["o_lora_a"].spec)[:3] == tuple(base_attn["o"].spec)[:3]
    assert tuple(ad_attn["o_lora_b"].spec)[-1] == tuple(base_attn["o"].spec)[-1] == "fsdp"
    assert state.params["layers"]["attn"]["q_lora_a"].sharding == ad_attn["q_lora_a"]


def test_only_adapters_train_and_merging_keeps_the_function(core_state) -> None:
    cfg, core, state = core_state
    opt_names = {path_parts(p)[-1] for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0] if x.ndim}
    assert opt_names and all(n.endswith((A_SUFFIX, B_SUFFIX)) for n in opt_names), opt_names
    base0, adapters0 = jax.device_get((state.frozen.base, state.params))
    batch = global_batch(LmBatch, random_batch(16, 64, 256, seed=1), core.batch_shardings)
    state = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)  # fixture intact
    for _ in range(3):
        state, metrics = core.step_fn(state, batch, jax.random.key(0))
    base1, adapters1 = jax.device_get((state.frozen.base, state.params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, base1, base0)
    b = adapters1["layers"]["attn"]["q_lora_b"]
    assert np.abs(b).max() > 0 and not np.array_equal(adapters1["layers"]["mlp"]["down_lora_a"],
                                                      adapters0["layers"]["mlp"]["down_lora_a"])
    full = model_params(jax.device_get(state))
    unmerged = logits(cfg.model, full, lora=core.model.lora)
    merged = logits(cfg.model, merge_adapters(full, core.model.lora.scale))
    assert np.abs(unmerged - logits(cfg.model, base1)).max() > 1e-3  # the adapters do change the function
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_same_losses_on_several_meshes_and_exact_resume(tmp_path) -> None:
    losses = {}
    for d, f, t in [(2, 2, 2), (8, 1, 1)]:
        cfg = tiny_config(*LORA, "lora.dropout=0.1", f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}",
                          "train.steps=3", "train.log_every=1", "checkpoint.every=2", f"run_dir={tmp_path}/{d}{f}{t}")
        losses[(d, f, t)] = [loss for _, loss in train(cfg, progress=False)["losses"]]
    ref = losses[(2, 2, 2)]
    for mesh, got in losses.items():
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=f"mesh {mesh}")
    # The checkpoint holds adapters + their optimizer state + a pointer to the base; resuming from step 2
    # reproduces step 3 exactly.
    run = tmp_path / "222"
    meta = json.loads((run / "checkpoints" / "3" / "meta" / "metadata").read_text())
    assert meta["lora"]["base"] is None and meta["lora"]["init_seed"] == 0
    assert all(k.endswith((A_SUFFIX, B_SUFFIX)) for k in meta["params"])
    before = [(r["step"], r["loss"]) for r in read_metrics(str(run))]
    shutil.rmtree(run / "checkpoints" / "3")
    cfg = tiny_config(*LORA, "lora.dropout=0.1", "train.steps=3", "train.log_every=1", "checkpoint.every=2",
                      f"run_dir={run}")
    assert train(cfg, progress=False)["resumed_from"] == 2
    assert [(r["step"], r["loss"]) for r in read_metrics(str(run))] == before
    other = tiny_config(*LORA, "lora.base_dtype=bfloat16", "train.steps=5", f"run_dir={run}")
    with pytest.raises(Exception, match="base_dtype='float32' but this config gives 'bfloat16'"):
        train(other, progress=False)


@pytest.mark.parametrize("overrides, message", [
    (["lora.rank=0"], "lora.rank must be a positive integer"),
    (["lora.targets=[q, query]"], "'query' is not a projection name; valid names: q, k, v, o, gate, up, down"),
    (["lora.targets=[attn/(q|x)$, shared_up]"], "'shared_up' matches no projection of this model; valid names: q, k, "
                                                "v, o, gate, up, down; weight paths for patterns: layers/attn/k"),
])
def test_bad_input_is_one_line_and_exit_2(overrides, message, capsys) -> None:
    assert cli_main(["inspect", "tiny", "lora.enabled=true", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_inspect_reports_trainable_params_and_optimizer_bytes(capsys) -> None:
    assert cli_main(["inspect", "tiny", *LORA, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    lo = report["lora"]
    # q, k, v, o, gate, up, down on 2 layers, rank 4: A [in, 4] + B [4, out] each.
    per_layer = 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert lo["trainable_params"] == 2 * per_layer
    assert lo["bytes_per_device"]["optimizer"] < report["bytes_per_device"]["optimizer"] / 3


def test_base_as_the_objectives_frozen_tree_is_the_same_arrays(core_state) -> None:
    """`lora_loss(..., base_is_reference=True)` hands the objective the base itself as its frozen tree (a DPO
    reference without a second copy), and the plain model on that tree computes the base model."""
    from maxlm.train.lora_state import lora_loss

    cfg, core, state = core_state
    seen = {}

    def inner(params, batch, rng, frozen):
        seen["params"], seen["frozen"] = params, frozen
        return jnp.zeros(()), {}

    lora_loss(inner, base_is_reference=True)(state.params, None, None, state.frozen)
    assert seen["frozen"] is state.frozen.base
    assert seen["params"]["layers"]["attn"]["q"] is state.frozen.base["layers"]["attn"]["q"]
    lora_loss(inner)(state.params, None, None, state.frozen)
    assert seen["frozen"] is None
    # The adapted model itself, applied to the base tree (no adapter leaves), is the base model.
    base = jax.device_get(state.frozen.base)
    np.testing.assert_array_equal(logits(cfg.model, base, lora=core.model.lora), logits(cfg.model, base))


def test_memory_guard_counts_only_adapters_as_trainable() -> None:
    """The pre-compile memory guard sees a LoRA run as one: the base without gradients or Adam moments (in
    `lora.base_dtype`), the adapters with them."""
    from maxlm.config import load_config, resolve_config_path
    from maxlm.flops import count_params
    from maxlm.plan.memory import estimate_memory
    from maxlm.train.memory_guard import lora_estimate

    cfg = load_config(resolve_config_path("llama3-8b"), ["mesh.fsdp=8", "mesh.data=1", *LORA, "lora.rank=8",
                                                         "lora.base_dtype=bfloat16"])
    n = count_params(cfg.model)
    full = estimate_memory(cfg.model, None, n, 2048, micro_rows=1, data=1, fsdp=8, tensor=1, expert=1, grad_accum=1,
                           remat="full", flash=False)
    lora = lora_estimate(cfg, full, n)
    frac = 20_971_520 / n.total  # rank 8 on all seven projections of 32 layers (the README's table)
    assert lora.grads == pytest.approx(full.grads * frac) and lora.optimizer == pytest.approx(full.optimizer * frac)
    assert lora.params == pytest.approx(full.params * (0.5 + frac))
    assert lora.activations == full.activations and lora.total < full.total - full.grads - full.optimizer
