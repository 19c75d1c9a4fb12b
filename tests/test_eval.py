"""`maxlm eval`: multiple-choice scores equal a direct log-likelihood computation and lm-evaluation-harness run on
a locally defined task through the maxlm adapter (also loglikelihood_rolling and generate_until); the loss task;
the win rate judged by a reward model; bad task rows are one line with exit code 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from maxlm.cli import main
from maxlm.eval.choice import read_choice_file
from maxlm.eval.scoring import split_continuation
from maxlm.eval.winrate import tally
from maxlm.generate import Request
from maxlm.mesh import build_mesh, logical_rules
from maxlm.model import Decoder
from maxlm.train.checkpoint import Checkpointer
from maxlm.train.optimizer import make_optimizer
from maxlm.train.state import init_state, state_layout
from test_generate_cli import run  # noqa: F401  (module fixture: tokenizer + checkpoint of random weights)

ROWS = [{"context": "def add(a, b):\n   ", "choices": ["return a + b", "x = 0", "class"], "gold": 0},
        {"context": "class", "choices": ["Point:", "add(", "y = 1"], "gold": 0},
        {"context": "x =", "choices": ["0", "1", "return"], "gold": 1}]


def direct_loglikelihood(model_cfg, params, ids: list[int], n_cont: int) -> float:
    """Sum of log p of the last n_cont tokens of `ids`, from one unbatched forward pass."""
    logits = np.asarray(jax.jit(lambda p, x: Decoder(model_cfg).apply({"params": p}, x))(
        jax.device_get(params), jnp.asarray([ids[:-1]])))[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    return float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1 - n_cont, len(ids) - 1)))


@pytest.fixture(scope="module")
def choice_file(run):
    root = run[0]
    path = root / "choice.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_choice_equals_direct_loglikelihood_and_lm_eval(run, choice_file, capsys) -> None:
    root, overrides, cfg, mesh, rules, params, tok = run
    assert main(["eval", "tiny", *overrides, "--task", "choice", "--task-file", str(choice_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((root / "run" / "eval.json").read_text())  # run_dir holds the checkpoint
    res = report["results"]
    lls, acc, acc_norm, k = [], [], [], 0
    for row in ROWS:
        ll = []
        for c in row["choices"]:
            ctx, cont = split_continuation(tok.encode, row["context"], " " + c)
            ll.append(direct_loglikelihood(cfg.model, params, [tok.bos_id] + ctx + cont, len(cont)))
        lls += ll
        acc.append(int(np.argmax(ll)) == row["gold"])
        acc_norm.append(int(np.argmax(np.asarray(ll) / [len(c) for c in row["choices"]])) == row["gold"])
    np.testing.assert_allclose(res["loglikelihoods"], lls, rtol=1e-5)
    assert res["acc"] == pytest.approx(np.mean(acc)) and res["acc_norm"] == pytest.approx(np.mean(acc_norm))

    # The same rows as an lm-evaluation-harness task defined locally, run through the maxlm adapter.
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from maxlm.eval.lm_eval_adapter import MaxlmLM

    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "local_choice.yaml").write_text(
        "task: maxlm_local_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {choice_file}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    lm = MaxlmLM("tiny", overrides=" ".join(overrides))
    out = lm_eval.simple_evaluate(model=lm, tasks=["maxlm_local_choice"], task_manager=TaskManager(
        include_path=str(tasks)), log_samples=False)
    harness = out["results"]["maxlm_local_choice"]
    assert harness["acc,none"] == pytest.approx(res["acc"]) and harness["acc_norm,none"] == pytest.approx(
        res["acc_norm"])

    text = "def add(a, b):\n    return a + b\n"
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [tok.bos_id] + tok.encode(text)
    assert rolling == pytest.approx(direct_loglikelihood(cfg.model, params, ids, len(ids) - 1), rel=1e-5)
    gen = lm.generate_until([Instance("generate_until", {}, ("class", {"until": ["\n"], "max_gen_toks": 6}), 0)])
    full = lm.engine.generate([Request(lm.head + tok.encode("class"), 6)])[0].text
    assert gen == [full.split("\n")[0]]


def test_loss_task_and_bad_rows(run, tmp_path: Path, capsys) -> None:
    root, overrides, *_ = run
    assert main(["eval", "tiny", *overrides, "data.source=text", "train.eval_steps=2", "--task", "loss",
                 "--task-file", str(root / "corpus.txt"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"])) and res["bits_per_byte"] > 0
    assert res["split"] == "train" and res["tokens"] > 0 and 0 < res["loss"] < 2 * math.log(320)
    bad = tmp_path / "bad.jsonl"
    for rows, expect in [([{"context": "a", "choices": ["b"]}], "bad.jsonl:1: missing field 'gold'"),
                         ([ROWS[0], {"context": "a", "choices": ["b", "c"], "gold": 2}],
                          "bad.jsonl:2: \"gold\" must be an index into choices (0..1), got 2")]:
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert main(["eval", "tiny", *overrides, "--task", "choice", "--task-file", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert expect in err and "\n" not in err
        with pytest.raises(Exception):
            read_choice_file(str(bad))


def test_tally_counts_and_interval() -> None:
    t = tally([3.0, 1.0, 2.0, 2.0, 5.0], [1.0, 2.0, 2.0, 0.0, 4.0])
    assert (t["wins"], t["ties"], t["losses"], t["prompts"]) == (3, 1, 1, 5)
    assert t["win_rate"] == pytest.approx(0.7) and t["win_rate_95"][0] <= 0.7 <= t["win_rate_95"][1]
    same = tally([1.0] * 4, [1.0] * 4)
    assert same["ties"] == 4 and same["win_rate"] == 0.5 and same["win_rate_95"] == [0.5, 0.5]


def test_win_rate_with_a_stand_in_judge() -> None:
    """The tally over a judge's scores: a judge that prefers longer sequences (the judge is any scoring function)."""
    from maxlm.eval.winrate import win_rate
    from maxlm.generate import Completion

    reqs = [Request([2, 5], 4), Request([2, 6], 4), Request([2, 7], 4)]
    a = [Completion([9, 9, 9], "length", 2), Completion([9], "eos", 2), Completion([9, 9], "eos", 2)]
    b = [Completion([8], "eos", 2), Completion([8, 8], "eos", 2), Completion([8, 8], "eos", 2)]
    seen: list[list[int]] = []

    def judge(seqs: list[list[int]]) -> list[float]:
        seen.extend(seqs)
        return [float(len(s)) for s in seqs]

    res = win_rate(reqs, a, b, judge, eos_id=3)
    assert seen[0] == [2, 5, 9, 9, 9, 3] and seen[3] == [2, 5, 8, 3]
    assert (res["wins"], res["ties"], res["losses"]) == (1, 1, 1) and res["win_rate"] == 0.5


def test_winrate_judged_by_a_reward_model(run, capsys) -> None:
    root, overrides, cfg, *_ = run
    # Model B: other random weights; the judge: a scalar-head (reward) model over the same tokenizer.
    for name, extra, seed in [("b", [], 5), ("judge", ["model.head=scalar", "train.objective=reward"], 7)]:
        c = tiny_config(*overrides, f"run_dir={root}/{name}", *extra)
        mesh, rules = build_mesh(c), logical_rules(c)
        model = Decoder(c.model)
        tx, _ = make_optimizer(c)
        state = init_state(c, model, tx, state_layout(c, model, tx, mesh, rules), mesh, rules, jax.random.key(seed))
        with Checkpointer(c, mesh) as ckpt:
            ckpt.save(1, state, jax.random.key(0), None)
    prompts = root / "winrate.jsonl"
    prompts.write_text('{"prompt": "def add("}\n{"prompt": "class"}\n{"prompt_ids": [2, 40, 41]}\n')
    assert main(["eval", "tiny", *overrides, "--task", "winrate", "--task-file", str(prompts), "--model-b",
                 str(root / "b"), "--judge", str(root / "judge"), "--max-new-tokens", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert res["wins"] + res["ties"] + res["losses"] == res["prompts"] == 3
    from maxlm.train.reward_score import load_reward_model, score_sequences

    model_cfg, jparams, _ = load_reward_model(str(root / "judge"))
    tok = run[-1]
    prompt_ids = [[tok.bos_id] + tok.encode("def add("), [tok.bos_id] + tok.encode("class"), [2, 40, 41]]
    for side in ("a", "b"):
        seqs = [p + row[f"answer_ids_{side}"] + [tok.eos_id] for p, row in zip(prompt_ids, res["per_prompt"])]
        np.testing.assert_allclose([row[f"score_{side}"] for row in res["per_prompt"]],
                                   score_sequences(model_cfg, jparams, seqs), rtol=1e-5)
    want = tally([r["score_a"] for r in res["per_prompt"]], [r["score_b"] for r in res["per_prompt"]])
    assert {k: res[k] for k in want} == want
