"""Multiple-choice log-likelihood tasks (`maxlm eval --task choice --task-file FILE`), scored as
lm-evaluation-harness scores `output_type: multiple_choice` (lm_eval/api/task.py, `process_results`).

Each JSONL line is {"context": str, "choices": [str, ...], "gold": int}. Every choice is the continuation
" " + choice of the context (the harness's default target delimiter), split from it as the harness does
(maxlm.eval.scoring.split_continuation); the context starts with bos when data.add_bos is set (as maxlm models are
trained). Per row: acc = [argmax_i ll_i == gold]; acc_norm = [argmax_i ll_i / len(choice_i) == gold], the
choice's length in characters. Reported: their means and the standard errors of those means.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from maxlm.config import ConfigError
from maxlm.eval.scoring import Scorer, split_continuation

DELIMITER = " "


@dataclass
class ChoiceRow:
    context: str
    choices: list[str]
    gold: int


def read_choice_file(path: str) -> list[ChoiceRow]:
    """The task's rows; a malformed line is one ConfigError naming file:line (exit 2)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"--task-file {path}: {e.strerror}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: expected an object with context, choices and gold")
        missing = [k for k in ("context", "choices", "gold") if k not in obj]
        if missing:
            raise ConfigError(f"{where}: missing field {missing[0]!r} (each row needs context, choices, gold)")
        ctx, choices, gold = obj["context"], obj["choices"], obj["gold"]
        if not isinstance(ctx, str) or not ctx:
            raise ConfigError(f"{where}: \"context\" must be a non-empty string")
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
            raise ConfigError(f"{where}: \"choices\" must be a non-empty list of non-empty strings")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise ConfigError(f"{where}: \"gold\" must be an index into choices (0..{len(choices) - 1}), got "
                              f"{gold!r}")
        rows.append(ChoiceRow(ctx, choices, gold))
    if not rows:
        raise ConfigError(f"--task-file {path} has no rows")
    return rows


def choice_requests(rows: list[ChoiceRow], tokenizer: Any, add_bos: bool) -> list[tuple[list[int], list[int]]]:
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    out = []
    for r in rows:
        for c in r.choices:
            ctx, cont = split_continuation(tokenizer.encode, r.context, DELIMITER + c)
            out.append((bos + ctx, cont))
    return out


def _mean_stderr(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    return float(np.mean(x)), float(np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def score_choices(rows: list[ChoiceRow], lls: list[float]) -> dict[str, Any]:
    """acc, acc_norm (and their standard errors) from the log-likelihoods of every row's choices, in order."""
    acc, acc_norm, k = [], [], 0
    for r in rows:
        ll = np.asarray(lls[k:k + len(r.choices)])
        k += len(r.choices)
        lengths = np.asarray([float(len(c)) for c in r.choices])
        acc.append(float(np.argmax(ll) == r.gold))
        acc_norm.append(float(np.argmax(ll / lengths) == r.gold))
    a, a_se = _mean_stderr(np.asarray(acc))
    an, an_se = _mean_stderr(np.asarray(acc_norm))
    return {"acc": a, "acc_stderr": a_se, "acc_norm": an, "acc_norm_stderr": an_se, "rows": len(rows)}


def run_choice(path: str, scorer: Scorer, tokenizer: Any, add_bos: bool) -> dict[str, Any]:
    rows = read_choice_file(path)
    lls = [ll for ll, _ in scorer.loglikelihood(choice_requests(rows, tokenizer, add_bos))]
    return score_choices(rows, lls) | {"loglikelihoods": lls}
