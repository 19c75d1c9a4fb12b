"""The objectives registry: each training objective is a batch type plus a pure loss, and nothing else.

The jitted step, the run builder and the evaluator look an objective up here by `train.objective`; the config schema
lists the same names (`maxlm.config.OBJECTIVE_NAMES`) so it can validate them without importing this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import flax.linen as nn

from maxlm.config import Config
from maxlm.train.batch import LmBatch
from maxlm.train.dpo import make_dpo_loss
from maxlm.train.losses import LossFn, make_pretrain_loss, make_sft_loss
from maxlm.train.preference_batch import PreferenceBatch
from maxlm.train.reward import make_reward_loss


@dataclass(frozen=True)
class Objective:
    """`batch_type` declares the batch (maxlm.train.batch); `make_loss(cfg, model)` builds the pure loss."""

    name: str
    batch_type: type
    make_loss: Callable[[Config, nn.Module], LossFn]


OBJECTIVES: dict[str, Objective] = {
    "pretrain": Objective("pretrain", LmBatch, make_pretrain_loss),
    "sft": Objective("sft", LmBatch, make_sft_loss),
    "dpo": Objective("dpo", PreferenceBatch, make_dpo_loss),
    "reward": Objective("reward", PreferenceBatch, make_reward_loss),
}
