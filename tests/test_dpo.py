"""DPO and reward models through `train`: ln 2 at step 0, frozen == precomputed, mesh/accumulation invariance,
bit-exact resume, and the bad-input errors."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from helpers import tiny_config
from maxlm.config import ConfigError
from maxlm.data.tokenizer import train_tokenizer
from maxlm.demo_pairs import write_stdlib_pairs
from maxlm.train.loop import train
from maxlm.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """~100 pairs from this repository's own sources (real lines vs a corrupted copy) and a tokenizer for them."""
    root = tmp_path_factory.mktemp("pairs")
    path = str(root / "pairs.jsonl")
    n = write_stdlib_pairs(os.path.join(REPO, "maxlm", "**", "*.py"), path, 96)
    assert n == 96
    tok = train_tokenizer(path, 400, str(root / "tok.model"))
    return path, tok


def dpo_config(pairs, run_dir, *extra):
    path, tok = pairs
    return tiny_config("model.vocab_size=512", "data.source=jsonl", "data.example_format=preference",
                       f"data.path={path}", f"data.tokenizer={tok}", "data.seq_len=128", "data.pairs_per_row=2",
                       "train.objective=dpo", "train.steps=3", "train.global_batch_size=8", "train.log_every=1",
                       "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=0.001", "checkpoint.every=0",
                       f"run_dir={run_dir}", *extra)


def rows(run_dir):
    return [r for r in read_metrics(str(run_dir)) if "loss" in r]


@pytest.fixture(scope="module")
def frozen_run(pairs, tmp_path_factory):
    """The reference run: 3 steps, frozen reference, mesh 2 x 2 x 2, no accumulation."""
    run_dir = tmp_path_factory.mktemp("frozen")
    train(dpo_config(pairs, run_dir, "dpo.reference=frozen"), progress=False)
    return rows(run_dir)


def test_first_step_is_ln2_with_the_reference_equal_to_the_policy(frozen_run):
    first, last = frozen_run[0], frozen_run[-1]
    assert first["loss"] == float(np.float32(math.log(2)))
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["rewards/accuracies"] == 0.0  # ties are not wins (TRL counts chosen > rejected)
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    assert last["rewards/margins"] > 0 and last["rewards/accuracies"] > 0.5 and last["loss"] < math.log(2)


KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def assert_close_rows(got, want, tol):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for k in KEYS:
            assert abs(a[k] - b[k]) <= tol * max(1.0, abs(b[k])), (a["step"], k, a[k], b[k])


def test_frozen_and_precomputed_give_the_same_losses(pairs, frozen_run, tmp_path):
    train(dpo_config(pairs, tmp_path, "dpo.reference=precomputed"), progress=False)
    stored = [n for n in os.listdir(tmp_path / "preference") if n.startswith("ref-")]
    assert len(stored) == 1
    assert_close_rows(rows(tmp_path), frozen_run, 1e-5)


def test_mesh_layouts_and_accumulation_keep_the_losses(pairs, frozen_run, tmp_path):
    """Pairs are never split: other data/fsdp/tensor layouts and 2 microbatches give the same losses."""
    for i, extra in enumerate([("train.grad_accum=2",), ("mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1")]):
        train(dpo_config(pairs, tmp_path / str(i), "dpo.reference=frozen", *extra), progress=False)
        assert_close_rows(rows(tmp_path / str(i)), frozen_run, 1e-5)


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(pairs, frozen_run, tmp_path):
    first = train(dpo_config(pairs, tmp_path, "dpo.reference=frozen", "train.steps=2"), progress=False)
    assert first["saved_steps"] == [2]
    summary = train(dpo_config(pairs, tmp_path, "dpo.reference=frozen"), progress=False)
    assert summary["resumed_from"] == 2
    got = rows(tmp_path)
    assert [(r["step"], r["loss"], r["rewards/margins"]) for r in got] == [
        (r["step"], r["loss"], r["rewards/margins"]) for r in frozen_run]
    ckpt = tmp_path / "checkpoints" / "3"
    assert not any("frozen" in name for _, dirs, _ in os.walk(ckpt) for name in dirs)


def test_reward_model_trains_and_scores_through_the_cli(pairs, tmp_path, capsys):
    from maxlm.cli import main as cli_main

    cfg = dpo_config(pairs, tmp_path / "rm", "train.objective=reward", "model.head=scalar", "dpo.reference=none",
                     "dpo.loss_type=simpo", "reward.center_rewards_coef=0.01")
    train(cfg, progress=False)
    got = rows(tmp_path / "rm")
    assert [r["step"] for r in got] == [1, 2, 3] and got[0]["loss"] > 0
    assert all(0 <= r["accuracy"] <= 1 for r in got) and "margin" in got[0]
    path, tok = pairs
    out = tmp_path / "scores.jsonl"
    assert cli_main(["reward", "score", str(tmp_path / "rm"), "--input", path, "--output", str(out)]) == 0
    scored = [__import__("json").loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == 96 and all(isinstance(r["chosen_score"], float) for r in scored)
    assert "accuracy" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("dpo.beta=0", "dpo.beta must be > 0"),
    ("dpo.label_smoothing=0.5", "dpo.label_smoothing must be in [0, 0.5)"),
    ("dpo.loss_type=[sigmoid,bogus]", "dpo.loss_type='bogus' is not one of"),
    ("dpo.reference=none", "dpo.reference=none but dpo.loss_type 'sigmoid' needs a reference model"),
    ("model.head=scalar", "train.objective=dpo with model.head=scalar"),
])
def test_bad_preference_keys_exit_2_with_one_line(pairs, tmp_path, capsys, override, message):
    from maxlm.cli import main as cli_main

    path, tok = pairs
    code = cli_main(["train", "tiny", "model.vocab_size=512", "data.source=jsonl", "data.example_format=preference",
                     f"data.path={path}", f"data.tokenizer={tok}", "train.objective=dpo", f"run_dir={tmp_path}",
                     override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_a_reference_of_another_shape_is_one_line_exit_2(pairs, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from maxlm.cli import main as cli_main

    hf_cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "ref")
    capsys.readouterr()  # transformers' own progress output
    path, tok = pairs
    code = cli_main(["train", "tiny", "model.vocab_size=512", "data.source=jsonl", "data.example_format=preference",
                     f"data.path={path}", f"data.tokenizer={tok}", "train.objective=dpo", "data.seq_len=128",
                     f"dpo.reference_from={tmp_path / 'ref'}", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "dpo.reference_from" in err and "shape" in err and len(err.splitlines()) == 1
