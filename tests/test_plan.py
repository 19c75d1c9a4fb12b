"""`maxlm plan`: laws and their optima, shapes, hyperparameters, memory, the fit, the sweep, and the CLI end to end."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from maxlm.config import ConfigError, load_config, validate
from maxlm.config import ModelConfig
from maxlm.flops import count_params, flops_per_token, mlp_params, moe_params
from maxlm.plan import hparams
from maxlm.plan.cli import main
from maxlm.plan.fit import RunPoint, derived, fit_isoflop, fit_parametric, fit_report, read_inputs
from maxlm.plan.laws import BUILTIN_LAWS, law_from_dict, load_law, numeric_optimum, optimum
from maxlm.plan.memory import (PARAM_BYTES, REMAT_BY_RECOMPUTE, STATE_BYTES_PER_PARAM, USABLE_HBM_FRACTION, choose_mesh,
                               estimate_memory, mesh_candidates, routed_expert_params)
from maxlm.plan.planner import PlanRequest, make_plan, plan_to_config
from maxlm.plan.shape import TOLERANCE, ffn_for, search_shape

GOPHER_BUDGET = 5.76e23  # Hoffmann et al. 2022: the compute of Gopher (and of Chinchilla 70B / 1.4T tokens)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# Laws


@pytest.mark.parametrize("name", list(BUILTIN_LAWS))
@pytest.mark.parametrize("compute", [1e15, 1e18, 1e21, GOPHER_BUDGET, 1e26])
def test_closed_form_equals_numeric_optimum(name: str, compute: float) -> None:
    law = BUILTIN_LAWS[name]
    opt = optimum(law, compute)
    n_num, d_num = numeric_optimum(law, compute)
    assert n_num == pytest.approx(opt.n, rel=1e-6) and d_num == pytest.approx(opt.d, rel=1e-6)
    assert 6 * opt.n * opt.d == pytest.approx(compute, rel=1e-12)
    # and it is a minimum along the IsoFLOP line
    for f in (0.9, 1.1):
        assert law.loss(opt.n * f, opt.d / f) > opt.loss


def test_printed_chinchilla_contradicts_chinchilla_and_epoch_does_not() -> None:
    """The README's reason for the default: at Gopher's budget the printed Approach 3 coefficients want ~90 tokens
    per parameter; Hoffmann et al. trained Chinchilla at 70B/1.4T = 20; the Epoch refit agrees with that."""
    printed = optimum(BUILTIN_LAWS["chinchilla"], GOPHER_BUDGET)
    epoch = optimum(BUILTIN_LAWS["epoch"], GOPHER_BUDGET)
    unrounded = optimum(BUILTIN_LAWS["chinchilla-unrounded"], GOPHER_BUDGET)
    assert 85 < printed.tokens_per_param < 100
    assert 15 < epoch.tokens_per_param < 25 and 60e9 < epoch.n < 80e9
    assert unrounded.n == pytest.approx(40e9, rel=0.05)  # Hoffmann et al. Fig. 4's Approach 3 projection: 40B
    assert BUILTIN_LAWS["kaplan"].exponent() > 0.55  # Kaplan: bigger models, fewer tokens


def test_law_without_interior_optimum_is_reported() -> None:
    bad = law_from_dict({"E": 1.5, "A": 400.0, "B": 400.0, "alpha": -0.1, "beta": 0.3}, where="test")
    with pytest.raises(ConfigError, match="no interior optimum"):
        optimum(bad, 1e21)
    with pytest.raises(ConfigError, match="no interior optimum"):
        numeric_optimum(bad, 1e21)  # the numeric search detects it on its own (minimum at the edge)
    with pytest.raises(ConfigError, match="no interior optimum"):
        make_plan(PlanRequest(compute=1e21, law=_write_json(bad.to_dict(), "/tmp/maxlm_test_bad_law.json")))


def _write_json(obj: object, path: str) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def test_law_files(tmp_path) -> None:
    path = _write_json({"E": 1.8, "A": 500, "B": 2000, "alpha": 0.35, "beta": 0.37}, str(tmp_path / "mine.json"))
    law = load_law(path)
    assert law.name == "mine" and law.alpha == 0.35
    kaplan = load_law(_write_json(BUILTIN_LAWS["kaplan"].to_dict(), str(tmp_path / "k.json")))
    assert kaplan == BUILTIN_LAWS["kaplan"]
    with pytest.raises(ConfigError, match="missing beta"):
        load_law(_write_json({"E": 1, "A": 1, "B": 1, "alpha": 0.3}, str(tmp_path / "bad.json")))
    with pytest.raises(ConfigError, match="neither a built-in law"):
        load_law("no-such-law")


def test_tokens_per_param_override() -> None:
    plan = make_plan(PlanRequest(compute=1e21, tokens_per_param=100))
    assert plan.optimum.d / plan.optimum.n == pytest.approx(100)
    assert plan.tokens == pytest.approx(1e21 / (6 * plan.shape.law_params), rel=0.01)  # the budget, on this shape


# ---------------------------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("compute", [1e17, 1e18, 1e19, 1e20, 1e21, 1e22, 1e23, 1e24, 1e25])
@pytest.mark.parametrize("law", ["epoch", "kaplan"])
def test_planned_shape_is_within_tolerance_and_well_proportioned(compute: float, law: str) -> None:
    plan = make_plan(PlanRequest(compute=compute, law=law))
    m, shape = plan.shape.model, plan.shape
    assert abs(shape.rel_error) <= TOLERANCE
    exact = count_params(m)
    assert shape.count.total == exact.total
    expected = exact.total if law == "epoch" else exact.total - exact.embedding - exact.lm_head
    assert shape.law_params == expected
    assert m.d_model % 128 == 0 and m.head_dim in (64, 128) and m.n_heads * m.head_dim == m.d_model
    assert m.ffn_dim == ffn_for(m.d_model) and m.ffn_dim % 256 == 0
    assert abs(m.ffn_dim / m.d_model - 8 / 3) < 0.35
    assert m.n_heads % m.n_kv_heads == 0
    if compute >= 1e19:  # below, the 32K vocabulary dominates the count and forces narrow models
        assert 40 <= m.d_model / m.n_layers <= 200  # published Llama/Chinchilla/GPT-3 range


@pytest.mark.parametrize("compute,vocab,law", [(1e14, 256, "epoch"), (1e18, 32000, "epoch"), (1e20, 32000, "kaplan"),
                                               (1e21, 32000, "epoch"), (1e22, 32000, "chinchilla")])
def test_planned_shape_count_equals_jax_eval_shape(compute: float, vocab: int, law: str) -> None:
    from maxlm.model import count_params_eval_shape

    plan = make_plan(PlanRequest(compute=compute, vocab=vocab, law=law))
    assert count_params_eval_shape(plan.shape.model) == plan.shape.count.total


def test_too_small_budget_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="lower --vocab"):
        make_plan(PlanRequest(compute=1e12))


def test_moe_plan_counts_active_parameters() -> None:
    dense = make_plan(PlanRequest(compute=1e21))
    moe = make_plan(PlanRequest(compute=1e21, moe=(8, 2)))
    pc = moe.shape.count
    assert abs(pc.active / moe.optimum.n - 1) <= TOLERANCE and pc.total > 2.5 * pc.active
    assert moe.shape.law_params == pc.active
    assert moe.flops_per_token == pytest.approx(dense.flops_per_token, rel=0.15)  # same active compute per token
    assert moe.to_dict()["model"]["num_experts"] == 8


def test_shape_overrides() -> None:
    s = search_shape(3e9, 32000, head_dim=64, kv_heads=4)
    assert s.model.head_dim == 64 and s.model.n_kv_heads == 4


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters, time, memory


def test_deepseek_formulas_and_their_compute() -> None:
    # DeepSeek LLM Sec. 3.2: M = 72 n d^2 + 6 n d l for an MHA model whose MLP has 8 d^2 parameters
    m = ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048)
    assert hparams.non_embedding_flops_per_token(m, 2048) == 72 * 12 * 768**2 + 6 * 12 * 768 * 2048
    assert hparams.deepseek_batch_tokens(1e21) == pytest.approx(0.2920 * 1e21**0.3271)
    assert hparams.deepseek_lr(1e21) == pytest.approx(0.3118 * 1e21**-0.125)
    plan = make_plan(PlanRequest(compute=1e21, hardware="h100", chips=64))
    assert plan.deepseek_compute == pytest.approx(
        hparams.non_embedding_flops_per_token(plan.shape.model, plan.request.seq_len) * plan.tokens, rel=0.01)
    assert plan.rows % 64 == 0 and plan.steps * plan.rows * plan.request.seq_len == plan.tokens
    assert plan.flops_per_token == flops_per_token(plan.shape.model, plan.request.seq_len)


def test_days_budget_fills_the_days_at_the_mfu() -> None:
    plan = make_plan(PlanRequest(hardware="h100", chips=64, days=3, mfu=0.4))
    assert plan.seconds / 86400 == pytest.approx(3, rel=0.01)  # counted FLOPs, incl. attention; steps rounding
    assert plan.compute < plan.training_flops  # the law's 6ND is below the counted FLOPs
    tpu = make_plan(PlanRequest(hardware="v5p", chips=256, days=1))
    assert tpu.hardware.name == "tpu-v5p"


def test_memory_model() -> None:
    plan = make_plan(PlanRequest(compute=1e22, hardware="h100", chips=64))
    m, pc = plan.shape.model, plan.shape.count
    kw = dict(micro_rows=4, data=1, grad_accum=1, flash=True)
    totals = {r: estimate_memory(m, None, pc, 4096, fsdp=1, tensor=1, remat=r, **kw).total for r in REMAT_BY_RECOMPUTE}
    assert totals["none"] > totals["dots"] >= totals["dots_no_batch"] > totals["full"]
    xla = {r: estimate_memory(m, None, pc, 4096, fsdp=1, tensor=1, remat=r, **(kw | {"flash": False})).total
           for r in REMAT_BY_RECOMPUTE}
    assert xla["dots"] > xla["dots_no_batch"]  # XLA attention's dots (QK^T, AV) are saved by `dots` only
    one = estimate_memory(m, None, pc, 4096, fsdp=1, tensor=1, remat="full", **kw)
    eight = estimate_memory(m, None, pc, 4096, fsdp=8, tensor=1, remat="full", **kw)
    assert eight.params == pytest.approx(one.params / 8) and eight.optimizer == pytest.approx(pc.total * 8 / 8)
    tp = estimate_memory(m, None, pc, 4096, fsdp=1, tensor=8, remat="none", **kw)
    assert tp.activations < estimate_memory(m, None, pc, 4096, fsdp=1, tensor=1, remat="none", **kw).activations
    assert xla["none"] > totals["none"]  # XLA attention stores the T x T probabilities


def test_config_data_source(tmp_path) -> None:
    plan = make_plan(PlanRequest(compute=1e18))
    assert plan_to_config(plan, "runs/x").data.source == "synthetic"
    tok = tmp_path / "tok.model"
    tok.write_text("x")
    cfg = plan_to_config(plan, "runs/x", str(tmp_path / "*.jsonl"), str(tok))
    assert cfg.data.source == "jsonl" and cfg.data.tokenizer == str(tok) and cfg.data.seq_len == 4096
    assert plan_to_config(plan, "runs/x", str(tmp_path / "*.txt"), str(tok)).data.source == "text"
    with pytest.raises(ConfigError, match="--tokenizer"):
        plan_to_config(plan, "runs/x", str(tmp_path / "*.txt"))


def test_mesh_choice_fits_validates_and_warns() -> None:
    plan = make_plan(PlanRequest(compute=1e23, hardware="h100", chips=64))
    e = plan.mesh.estimate
    assert plan.mesh.fits and e.total <= plan.mesh.usable_bytes
    assert e.data * e.fsdp * e.tensor == 64 and e.fsdp * e.tensor > 1  # 28B params do not fit unsharded
    cfg = plan_to_config(plan, "runs/x")
    assert validate(cfg, 64)["fsdp"] == e.fsdp
    smaller = choose_mesh(plan.shape.model, None, plan.shape.count, 4096, global_rows=plan.rows, chips=64,
                          hbm_bytes=plan.hardware.hbm_bytes, remat="full")
    assert smaller.estimate == e
    huge = make_plan(PlanRequest(compute=1e25, hardware="h100", chips=1))
    assert not huge.mesh.fits and any("nothing fits" in n for n in huge.notes)
    auto = make_plan(PlanRequest(compute=3e18, hardware="h100", chips=8, remat="auto"))
    assert auto.mesh.fits and auto.mesh.estimate.remat == "none"
    # at 1e19, `none` (15 rows x 4096 per chip; on GPUs the f32 logits and their gradient are two buffers) exceeds
    # the 72 GB usable: auto falls back to the next policy
    assert make_plan(PlanRequest(compute=1e19, hardware="h100", chips=8, remat="auto")).mesh.estimate.remat == "dots"


def test_moe_memory_splits_routed_experts_over_expert() -> None:
    """State per chip = 16 B x (N_dense / (fsdp x tensor) + N_routed / (expert x fsdp x tensor)): going from expert=1
    to expert=k saves exactly the routed experts' (1 - 1/k) share; dense plans never see an expert axis."""
    plan = make_plan(PlanRequest(compute=1e21, moe=(8, 2)))
    m, pc, moe = plan.shape.model, plan.shape.count, plan.shape.moe
    routed, routed_layer = routed_expert_params(m)
    assert routed_layer == 8 * mlp_params(m.d_model, m.ffn_dim) == moe_params(m)[0] - m.d_model * 8  # minus router
    assert routed == m.n_layers * routed_layer and 0.9 * pc.total < routed < pc.total
    kw = dict(micro_rows=4, data=1, fsdp=2, tensor=2, grad_accum=1, remat="full", flash=True)
    one = estimate_memory(m, moe, pc, 4096, expert=1, **kw)
    assert one == estimate_memory(m, moe, pc, 4096, **kw)  # expert defaults to 1
    assert one.params == pytest.approx(pc.total * PARAM_BYTES / 4)  # expert=1: plain fsdp x tensor, as for dense
    for k in (2, 4, 8):
        ek = estimate_memory(m, moe, pc, 4096, expert=k, **kw)
        state = lambda e: e.params + e.grads + e.optimizer  # noqa: E731
        assert state(one) - state(ek) == pytest.approx(STATE_BYTES_PER_PARAM * routed * (1 - 1 / k) / 4)
        assert ek.params == pytest.approx(((pc.total - routed) + routed / k) * PARAM_BYTES / 4)
        # the gathered layer holds only the local experts: bf16 x 2 copies (fsdp > 1) + f32 grads, over tensor;
        # the bf16 cast of the layer stack, sharded like the state, only the local experts too
        assert one.workspace - ek.workspace == pytest.approx(routed_layer * (1 - 1 / k) * (2 * 2 + 4) / 2
                                                             + routed * (1 - 1 / k) * 2 / 4)
        assert ek.working > one.working  # the dropless exchange pads to expert x K rows per token
    dense = make_plan(PlanRequest(compute=1e21))
    assert {e for e, _, _ in mesh_candidates(dense.shape.model, 64)} == {1}
    assert {e for e, _, _ in mesh_candidates(m, 64, 8)} == {1, 2, 4, 8}


def test_moe_written_config_builds_with_the_planned_expert_sharding(tmp_path) -> None:
    """A tiny MoE plan on 8 chips of a (pretend) ~50 MB HBM, one row per chip: unsharded state does not fit, and the
    least sharding that does puts the 4 experts on expert=2 (expert before fsdp at equal sharding). The written
    config loads, validates on the 8 CPU devices, builds the planned parameter count, and the real shardings of
    its parameters hold exactly the planned bytes per chip (fsdp = tensor = 1: the router and norms are unsplit
    in both)."""
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding

    from maxlm.config import config_to_yaml
    from maxlm.mesh import build_mesh, check_divisible, logical_rules, logical_specs, to_mesh_shardings
    from maxlm.model import count_params_eval_shape
    from maxlm.model.transformer import abstract_params

    plan = make_plan(PlanRequest(compute=1e15, moe=(4, 2), vocab=256, seq_len=64, hardware="h100", chips=8))
    m, pc, moe = plan.shape.model, plan.shape.count, plan.shape.moe
    unsharded = estimate_memory(m, moe, pc, 64, micro_rows=1, data=8, fsdp=1, tensor=1, grad_accum=1, remat="full",
                                flash=True)
    hbm = 0.75 * unsharded.total / USABLE_HBM_FRACTION
    choice = choose_mesh(m, moe, pc, 64, global_rows=8, chips=8, hbm_bytes=hbm, remat="full")
    e = choice.estimate
    assert choice.fits and (e.expert, e.fsdp, e.tensor, e.data) == (2, 1, 1, 4)
    small = dataclasses.replace(plan, rows=8, mesh=choice)
    path = tmp_path / "moe.yml"
    path.write_text(config_to_yaml(plan_to_config(small, str(tmp_path / "run"))))
    cfg = load_config(str(path))
    assert cfg.model.ffn == "moe" and cfg.model.num_experts == 4 and cfg.model.experts_per_token == 2
    assert validate(cfg, 8)["expert"] == 2 and cfg.train.global_batch_size == 8
    assert count_params_eval_shape(cfg.model) == count_params(cfg.model).total == plan.shape.count.total
    abstract = abstract_params(cfg.model)
    mesh = build_mesh(cfg)
    shardings = to_mesh_shardings(logical_specs(abstract), mesh, logical_rules(cfg))
    check_divisible(nn.unbox(abstract), shardings, mesh)
    leaves = jax.tree_util.tree_leaves(nn.unbox(abstract))
    specs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    per_chip_params = sum(math.prod(sh.shard_shape(x.shape)) for x, sh in zip(leaves, specs, strict=True))
    assert per_chip_params * PARAM_BYTES == e.params


# ---------------------------------------------------------------------------------------------------------------
# Fitting


def _synthetic_runs(law_name: str = "epoch", noise: float = 0.005, seed: int = 1, budgets: int = 10,
                    sizes: int = 10) -> list[RunPoint]:
    """An IsoFLOP grid of runs with losses drawn from a known law times log-normal noise."""
    law = BUILTIN_LAWS[law_name]
    rng = np.random.default_rng(seed)
    runs = []
    for c in np.logspace(17, 21, budgets):
        n0 = optimum(law, c).n
        for f in np.geomspace(1 / 4, 4, sizes):
            n, d = n0 * f, c / (6 * n0 * f)
            runs.append(RunPoint(n, d, law.loss(n, d) * math.exp(rng.normal(0, noise)), c))
    return runs


def test_fit_recovers_known_coefficients() -> None:
    truth = BUILTIN_LAWS["epoch"]
    exact = derived(fit_parametric(_synthetic_runs(noise=0.0)).theta)
    for k in ("E", "A", "B", "alpha", "beta"):
        assert float(exact[k][0]) == pytest.approx(getattr(truth, k), rel=1e-3)
    runs = _synthetic_runs(noise=0.005)
    report = fit_report(runs, resamples=50)
    assert report["alpha"] == pytest.approx(truth.alpha, abs=0.02)
    assert report["beta"] == pytest.approx(truth.beta, abs=0.02)
    assert report["E"] == pytest.approx(truth.E, abs=0.05)
    assert report["a"] == pytest.approx(truth.exponent(), abs=0.01)
    lo, hi = report["intervals"]["a"]
    assert lo < report["a"] < hi and hi - lo < 0.05
    assert report["interior_optimum"]
    # the fitted law plans like the truth
    fitted = law_from_dict(report)
    assert optimum(fitted, 1e22).n == pytest.approx(optimum(truth, 1e22).n, rel=0.1)


def test_isoflop_parabolas_recover_the_exponent() -> None:
    iso = fit_isoflop(_synthetic_runs(noise=0.002))
    assert len(iso.budgets) == 10
    assert iso.a == pytest.approx(BUILTIN_LAWS["epoch"].exponent(), abs=0.02)
    for b in iso.budgets:
        assert b.n_opt == pytest.approx(optimum(BUILTIN_LAWS["epoch"], b.compute).n, rel=0.15)


def test_fit_needs_enough_runs() -> None:
    with pytest.raises(ConfigError, match="at least 5 runs"):
        fit_parametric(_synthetic_runs()[:3])


def _write_csv(runs: list[RunPoint], path: str, with_c: bool = True) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["N", "D", "loss"] + (["C"] if with_c else []))
        for r in runs:
            w.writerow([r.n, r.d, r.loss] + ([r.c] if with_c else []))
    return path


def test_fit_reads_csv_and_run_directories(tmp_path) -> None:
    runs = _synthetic_runs(budgets=2, sizes=3)
    got = read_inputs([_write_csv(runs, str(tmp_path / "r.csv"), with_c=False)])
    assert [g.n for g in got] == pytest.approx([r.n for r in runs])
    assert [g.d for g in got] == pytest.approx([r.d for r in runs])
    assert got[0].c == pytest.approx(6 * runs[0].n * runs[0].d)
    # a maxlm run directory: the saved config + metrics.jsonl
    plan = make_plan(PlanRequest(compute=1e16, vocab=256, seq_len=64))
    cfg = plan_to_config(plan, str(tmp_path / "runs" / "a"))
    os.makedirs(cfg.run_dir)
    from maxlm.config import config_to_yaml

    with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
        f.write(config_to_yaml(cfg))
    with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "w") as f:
        for step, loss in [(10, 5.0), (20, 4.0)]:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
    (point,) = read_inputs([str(tmp_path / "runs")])  # a directory of run directories
    assert point.n == plan.shape.count.total and point.loss == 4.0
    assert point.d == 20 * cfg.train.global_batch_size * cfg.data.seq_len
    with pytest.raises(ConfigError, match="not found"):
        read_inputs([str(tmp_path / "nope.csv")])
    bad = tmp_path / "bad.csv"
    bad.write_text("params,loss\n1,2\n")
    with pytest.raises(ConfigError, match="missing D"):
        read_inputs([str(bad)])


# ---------------------------------------------------------------------------------------------------------------
# The CLI end to end


def test_cli_plan_json_and_table(capsys) -> None:
    assert main(["--compute", "1e21", "--hardware", "h100", "--chips", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compute_6nd"] == 1e21 and out["law"]["name"] == "epoch"
    assert out["params"]["total"] == count_params(ModelConfig(**{
        k: out["model"][k] for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                                     "vocab_size", "tie_embeddings")})).total
    assert out["memory"]["fits"] and out["hardware"]["days"] > 0
    assert main(["--hardware", "h100", "--chips", "64", "--days", "2", "--law", "kaplan", "--moe", "8,2"]) == 0
    text = capsys.readouterr().out
    assert "N_opt" in text and "wall-clock" in text and "experts" in text


def test_cli_write_config_moe_places_experts_on_the_expert_axis(tmp_path, capsys) -> None:
    """`--moe 8,2 --write-config` on 64 H100s: 9.9B parameters (9.3B of them routed experts) need 16 x 9.9B bytes
    of f32 state + Adam unsharded, so the mesh must shard. At 4-way sharding expert=4 comes first, but its padded
    dropless exchange (4 x 2 rows per token through the recomputed experts, 8 rows x 4096 per chip) does not fit,
    so the plan takes fsdp=4. The YAML loads and validates on 64 devices with the planned count and mesh."""
    path = str(tmp_path / "moe.yml")
    argv = ["--compute", "1e21", "--moe", "8,2", "--hardware", "h100", "--chips", "64"]
    assert main(argv + ["--write-config", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = make_plan(PlanRequest(compute=1e21, moe=(8, 2), hardware="h100", chips=64))
    cfg = load_config(path)
    shape = validate(cfg, 64)
    m = cfg.model
    assert m.ffn == "moe" and m.num_experts == 8 and m.experts_per_token == 2 and m.capacity_factor == 0
    assert 8 % cfg.mesh.expert == 0 and shape["expert"] == cfg.mesh.expert
    e = plan.mesh.estimate
    assert e.expert * e.fsdp * e.tensor == 4
    over = estimate_memory(m, plan.shape.moe, plan.shape.count, 4096, micro_rows=e.micro_rows, data=16, fsdp=1,
                           tensor=1, expert=4, grad_accum=e.grad_accum, remat=e.remat, flash=True, platform="cuda")
    assert over.total > plan.mesh.usable_bytes >= e.total
    e = plan.mesh.estimate
    assert plan.mesh.fits and (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.expert) == (
        e.data, e.fsdp, e.tensor, e.expert)
    assert e.data * e.fsdp * e.tensor * e.expert == 64 and cfg.train.grad_accum == e.grad_accum
    assert count_params(m).total == plan.shape.count.total == out["params"]["total"]
    assert out["memory"]["expert"] == e.expert
    assert STATE_BYTES_PER_PARAM * plan.shape.count.total > plan.mesh.usable_bytes  # must shard at all
    assert main(argv) == 0
    assert f"expert={e.expert} ({8 // e.expert} experts per chip)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["--compute", "1e21", "--days", "3", "--hardware", "h100", "--chips", "8"], "one way"),
    (["--days", "3"], "--days needs"),
    (["--compute", "1e21", "--hardware", "abacus"], "is not one of"),
    (["--compute", "1e21", "--moe", "8"], "E,K"),
    (["--compute", "1e21", "--moe", "2,3"], "1 <= K <= E"),
    (["--compute", "1e21", "--mfu", "1.5"], "--mfu"),
    (["--compute", "x"], "invalid float"),
    (["--compute", "1e21", "--law", "nope"], "neither a built-in law"),
    (["sweep", "--budgets", "1e17", "--points", "2"], "--points"),
    (["fit"], "required"),
])
def test_cli_errors_are_one_line_config_errors(argv: list[str], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg) as e:
        main(argv)
    assert "\n" not in str(e.value)


def test_cli_subprocess() -> None:
    env = os.environ | {"PYTHONPATH": REPO}
    ok = subprocess.run([sys.executable, "-m", "maxlm.plan.cli", "--compute", "1e21"], capture_output=True,
                        text=True, cwd=REPO, env=env)
    assert ok.returncode == 0 and "tokens per parameter" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "maxlm.plan.cli", "--compute", "-1"], capture_output=True, text=True,
                         cwd=REPO, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_sweep_fit_plan_loop(tmp_path, capsys) -> None:
    """sweep writes loadable configs; a fit of runs on those shapes (losses from a known law) feeds the planner."""
    out = tmp_path / "sweep"
    assert main(["sweep", "--budgets", "1e17,1e18,1e19", "--points", "5", "--out", str(out),
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    capsys.readouterr()
    paths = sorted(p for p in os.listdir(out) if p.endswith(".yml"))
    assert len(paths) >= 12  # 3 budgets x 5 sizes, minus shapes that coincide
    law = BUILTIN_LAWS["chinchilla-unrounded"]
    runs = []
    for p in paths:
        cfg = load_config(str(out / p))
        n = count_params(cfg.model).total
        d = cfg.train.steps * cfg.tokens_per_step
        budget = float(p.split("_")[0][1:].replace("p", "."))
        assert 6 * n * d == pytest.approx(budget, rel=0.05)
        runs.append(RunPoint(n, d, law.loss(n, d), 6 * n * d))
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == len(paths)
    fitted = tmp_path / "fitted.json"
    png = tmp_path / "iso.png"
    argv = ["fit", _write_csv(runs, str(tmp_path / "runs.csv")), "--out", str(fitted), "--bootstrap", "20"]
    if _has_matplotlib():
        argv += ["--plot", str(png)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "alpha" in text and "IsoFLOP" in text
    report = json.loads(fitted.read_text())
    assert report["alpha"] == pytest.approx(law.alpha, abs=0.01) and report["beta"] == pytest.approx(law.beta, abs=0.01)
    assert len(report["isoflop"]["budgets"]) == 3
    if _has_matplotlib():
        assert png.stat().st_size > 10_000
    assert main(["--law", str(fitted), "--compute", "1e21", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["optimum"]["n"] == pytest.approx(optimum(law, 1e21).n, rel=0.1)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_write_config_validates_and_trains_one_step(tmp_path, capsys) -> None:
    """A genuinely small budget: the planned shape itself trains one step on the 8-device CPU mesh."""
    path = str(tmp_path / "planned.yml")
    assert main(["--compute", "1e14", "--vocab", "256", "--seq-len", "64", "--write-config", path]) == 0
    assert "wrote" in capsys.readouterr().out
    with open(path) as f:
        assert set(yaml.safe_load(f)) >= {"model", "data", "optim", "train", "mesh"}
    plan = make_plan(PlanRequest(compute=1e14, vocab=256, seq_len=64))
    cfg = load_config(path)
    assert count_params(cfg.model).total == plan.shape.count.total
    assert cfg.train.steps == plan.steps and cfg.optim.lr == pytest.approx(plan.lr, rel=1e-3)
    run_dir = str(tmp_path / "run")
    cfg = load_config(path, ["train.steps=1", f"run_dir={run_dir}", "mesh.data=8", "mesh.fsdp=1",
                             "train.global_batch_size=8", "data.seq_len=32"])
    from maxlm.train.loop import train

    summary = train(cfg)
    assert len(summary["losses"]) == 1 and math.isfinite(summary["losses"][0][1])
    (point,) = read_inputs([run_dir])  # the fit reads a real run directory
    assert point.n == plan.shape.count.total and point.d == 8 * 32
