"""Win rate of model A against model B on a prompt set, judged by a maxlm reward model (`--task winrate`).

Both models answer every prompt (the prompts-file format of `maxlm generate`, with the same decoding settings);
the judge scores each (prompt, answer) and A wins a prompt when its answer scores higher, ties when the scores are
within `tie_margin`. Win rate = (wins + ties / 2) / prompts, with a 95% percentile bootstrap interval over prompts
(2000 resamples, fixed seed), which holds for the three-valued outcome where a binomial interval would not.

The judge is any function from token sequences to scores (`Judge`); `load_judge` makes one from a reward-model
checkpoint trained by maxlm (train.objective=reward, model.head=scalar: maxlm.train.reward_score). It reads the
sequence the reward model was trained on: the prompt's ids, the answer's ids, then eos; the generators and the
judge must therefore share a tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from maxlm.generate.engine import Completion, Request

Judge = Callable[[list[list[int]]], list[float]]
BOOTSTRAP = 2000


def load_judge(checkpoint: str, batch_size: int = 16) -> Judge:
    """A judge from a maxlm reward-model checkpoint (run directory, checkpoint directory or step directory)."""
    from maxlm.train.reward_score import load_reward_model, score_sequences

    model_cfg, params, _ = load_reward_model(checkpoint)
    return lambda seqs: score_sequences(model_cfg, params, seqs, batch_size)


def judged_sequences(requests: Sequence[Request], answers: Sequence[Completion], eos_id: int | None
                     ) -> list[list[int]]:
    tail = [eos_id] if eos_id is not None else []
    return [list(r.prompt_ids) + list(a.completion_ids) + tail for r, a in zip(requests, answers)]


def bootstrap_interval(outcomes: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss)."""
    rs = np.random.RandomState(seed)
    means = outcomes[rs.randint(0, len(outcomes), size=(BOOTSTRAP, len(outcomes)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def tally(scores_a: Sequence[float], scores_b: Sequence[float], tie_margin: float = 0.0) -> dict[str, Any]:
    diff = np.asarray(scores_a, np.float64) - np.asarray(scores_b, np.float64)
    wins, losses = int(np.sum(diff > tie_margin)), int(np.sum(diff < -tie_margin))
    ties = len(diff) - wins - losses
    outcomes = np.where(diff > tie_margin, 1.0, np.where(diff < -tie_margin, 0.0, 0.5))
    lo, hi = bootstrap_interval(outcomes)
    return {"wins": wins, "ties": ties, "losses": losses, "prompts": len(diff),
            "win_rate": float(outcomes.mean()), "win_rate_95": [lo, hi], "mean_score_a": float(np.mean(scores_a)),
            "mean_score_b": float(np.mean(scores_b))}


def win_rate(requests: Sequence[Request], answers_a: Sequence[Completion], answers_b: Sequence[Completion],
             judge: Judge, eos_id: int | None, tie_margin: float = 0.0) -> dict[str, Any]:
    """Judges both models' answers prompt by prompt and tallies them."""
    scores = judge(judged_sequences(requests, answers_a, eos_id) + judged_sequences(requests, answers_b, eos_id))
    n = len(requests)
    out = tally(scores[:n], scores[n:], tie_margin)
    out["per_prompt"] = [{"score_a": a, "score_b": b, "answer_a": x.text, "answer_b": y.text,
                          "answer_ids_a": x.completion_ids, "answer_ids_b": y.completion_ids}
                         for a, b, x, y in zip(scores[:n], scores[n:], answers_a, answers_b)]
    return out
