"""LoRA with the preference objectives: `dpo.reference: base` (the base without adapters as the DPO reference, no
second copy of the weights) gives the losses of a frozen copy of the same base, and a reward model trains its fresh
scalar head beside the adapters and scores through `maxlm reward score` (merged into its base on load)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from maxlm.config import ConfigError
from maxlm.train.builder import build_core, initial_state
from maxlm.train.loop import train
from test_dpo import dpo_config, pairs, rows  # noqa: F401  (pairs is a fixture)

LORA = ("lora.enabled=true", "lora.rank=4", "lora.alpha=8", "optim.lr=0.01")
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def test_base_reference_equals_a_frozen_copy_of_the_base(pairs, tmp_path):
    got = {}
    for mode in ("base", "frozen"):
        train(dpo_config(pairs, tmp_path / mode, *LORA, f"dpo.reference={mode}"), progress=False)
        got[mode] = rows(tmp_path / mode)
    base, frozen = got["base"], got["frozen"]
    assert [r["step"] for r in base] == [1, 2, 3]
    assert base[0]["loss"] == float(np.float32(math.log(2)))  # B = 0: the policy is the base at step 0
    assert base[-1]["rewards/margins"] > 0 and base[-1]["loss"] < math.log(2)  # the adapters learned
    for key in KEYS:
        np.testing.assert_allclose([r[key] for r in base], [r[key] for r in frozen], rtol=1e-5, atol=1e-6,
                                   err_msg=key)


def test_base_reference_holds_no_second_copy(pairs, tmp_path):
    base = build_core(dpo_config(pairs, tmp_path, *LORA, "dpo.reference=base"))
    frozen = build_core(dpo_config(pairs, tmp_path, *LORA, "dpo.reference=frozen"))
    assert base.layout.abstract.frozen.objective is None
    assert frozen.layout.abstract.frozen.objective is not None  # the copy `base` saves


@pytest.mark.parametrize("extra, message", [
    (("dpo.reference=base",), "dpo.reference=base is the LoRA base model without its adapters"),
    ((*LORA, "dpo.reference=base", "dpo.reference_from=/"), "dpo.reference=base uses the LoRA base"),
])
def test_base_reference_mistakes_are_one_line(pairs, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_core(dpo_config(pairs, tmp_path, *extra))


def test_lora_reward_model_trains_its_head_and_scores(pairs, tmp_path, capsys):
    from maxlm.cli import main as cli_main
    from maxlm.train.reward_score import load_reward_model

    cfg = dpo_config(pairs, tmp_path / "rm", *LORA, "train.objective=reward", "model.head=scalar",
                     "dpo.reference=none", "dpo.loss_type=simpo", "checkpoint.every=3")
    core = build_core(cfg)
    assert "score" in core.layout.abstract.params and "score" not in core.layout.abstract.frozen.base
    head0 = np.asarray(initial_state(core).params["score"]["kernel"])
    train(cfg, progress=False)
    got = rows(tmp_path / "rm")
    assert [r["step"] for r in got] == [1, 2, 3] and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in got)
    path, _ = pairs
    out = tmp_path / "scores.jsonl"
    assert cli_main(["reward", "score", str(tmp_path / "rm"), "--input", path, "--output", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == 96 and len({r["chosen_score"] for r in scored}) > 1
    model_cfg, params, _ = load_reward_model(str(tmp_path / "rm"))
    assert model_cfg.head == "scalar"
    assert np.abs(np.asarray(params["score"]["kernel"]) - head0).max() > 1e-4  # the head trained with the adapters
    assert "accuracy" in capsys.readouterr().err

    # PEFT: the head travels as modules_to_save (task SEQ_CLS) and comes back with the adapters.
    peft_dir = tmp_path / "peft"
    assert cli_main(["lora", "export-peft", str(tmp_path / "rm"), str(peft_dir)]) == 0
    pc = json.loads((peft_dir / "adapter_config.json").read_text())
    assert pc["task_type"] == "SEQ_CLS" and pc["modules_to_save"] == ["score"]
    again = build_core(dpo_config(pairs, tmp_path / "again", *LORA, "train.objective=reward", "model.head=scalar",
                                  "dpo.reference=none", "dpo.loss_type=simpo", f"lora.load_adapter_from={peft_dir}"))
    imported = initial_state(again).params
    with ocp.StandardCheckpointer() as ckpt:
        saved = ckpt.restore(str(tmp_path / "rm" / "checkpoints" / "3" / "params"))
    flat_i = jax.tree_util.tree_leaves_with_path(imported)
    flat_s = dict(jax.tree_util.tree_leaves_with_path(saved))
    assert len(flat_i) == len(flat_s)
    for path, x in flat_i:
        np.testing.assert_allclose(np.asarray(x), np.asarray(flat_s[path]), rtol=1e-6, err_msg=str(path))
