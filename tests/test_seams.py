"""The seams post-training builds on: hidden states apart from the LM head, frozen trees in the train state, and
batch types whose leaves are not all [B, T] (pairs and per-example scalars) going through the one step."""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from maxlm.model import Decoder
from maxlm.model.heads import lm_logits
from maxlm.train.batch import Field, LmBatch, abstract_batch, batch_shardings, global_batch, local_batch
from maxlm.train.builder import build_core
from maxlm.train.state import init_state
from maxlm.train.step import make_train_step


@pytest.mark.parametrize("tied", [False, True])
def test_hidden_states_then_lm_head_equal_the_logits(tied: bool) -> None:
    cfg = tiny_config(f"model.tie_embeddings={str(tied).lower()}").model
    model = Decoder(cfg)
    b = random_batch(2, 16, cfg.vocab_size, docs_per_row=2)
    params = nn.unbox(model.init(jax.random.key(0), b["inputs"])["params"])
    logits = model.apply({"params": params}, b["inputs"], b["inputs_segment_ids"], b["inputs_positions"])
    hidden = model.apply({"params": params}, b["inputs"], b["inputs_segment_ids"], b["inputs_positions"],
                         hidden_only=True)
    assert hidden.shape == (2, 16, cfg.d_model)
    np.testing.assert_array_equal(lm_logits(cfg, params, hidden), logits)


@flax.struct.dataclass
class PairBatch:
    """A preference-shaped batch: [P, 2, T] token pairs and a [P] per-pair scalar."""

    FIELDS: ClassVar[dict[str, Field]] = {
        "tokens": Field(("pairs", "two", "length"), np.int32, ("act_batch", None, "act_length")),
        "offset": Field(("pairs",), np.float32, ("act_batch",)),
    }
    tokens: jax.Array
    offset: jax.Array


def test_frozen_tree_and_pair_batches_go_through_the_step() -> None:
    """The loss reads `frozen` (never updated, outside the optimizer), and a batch of pairs is split by grad_accum
    along its pair axis only: each microbatch sees whole pairs with their own scalars, so 1 and 4 microbatches
    give the same loss and gradients."""
    results = []
    for k in (1, 4):
        cfg = tiny_config(f"train.grad_accum={k}", "train.global_batch_size=16")
        core = build_core(cfg)
        params_abstract = core.layout.abstract.params
        state = init_state(cfg, core.model, core.tx, core.layout, core.mesh, core.rules, jax.random.key(0))
        frozen = jax.tree_util.tree_map(lambda x: x * 0 + 1.0, state.params)  # a "reference" of ones
        state = state.replace(frozen=frozen)
        frozen = jax.device_get(frozen)  # the state is donated to the step: compare with a host copy
        shardings = batch_shardings(PairBatch, core.mesh, core.rules)
        assert shardings.tokens.spec[0] == ("data", "fsdp", "expert") and shardings.offset.spec[0] == (
            "data", "fsdp", "expert")

        def loss_fn(params: Any, batch: PairBatch, rng: jax.Array, frozen: Any) -> tuple[jax.Array, dict]:
            # per pair: (first token of sequence 0 - of sequence 1) * embed[0, 0] + offset, with the frozen tree.
            e = params["embed"]["embedding"][0, 0] * frozen["embed"]["embedding"][0, 0]
            per_pair = (batch.tokens[:, 0, 0] - batch.tokens[:, 1, 0]).astype(jnp.float32) * e + batch.offset
            n = jnp.float32(per_pair.shape[0])
            return jnp.sum(per_pair ** 2) / n, {"weight": n, "offset_mean": jnp.mean(batch.offset)}

        layout_sh = core.layout.shardings.replace(frozen=jax.tree_util.tree_map(lambda s: s,
                                                                                core.layout.shardings.params))
        step = make_train_step(loss_fn, core.tx, core.schedule, k, layout_sh, shardings, core.mesh, core.rules)
        rs = np.random.RandomState(0)
        local = {"tokens": rs.randint(0, 50, (16, 2, 16)), "offset": rs.randn(16).astype(np.float32)}
        abstract = abstract_batch(PairBatch, {"pairs": 16, "two": 2, "length": 16}, shardings)
        assert abstract.tokens.shape == (16, 2, 16) and abstract.offset.shape == (16,)
        new_state, metrics = step(state, global_batch(PairBatch, local, shardings), jax.random.key(1))
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(np.all(np.asarray(a) == b)), new_state.frozen,
                                                             frozen))
        assert jax.tree_util.tree_structure(new_state.opt_state) == jax.tree_util.tree_structure(state.opt_state)
        assert jax.tree_util.tree_structure(new_state.params) == jax.tree_util.tree_structure(params_abstract)
        results.append((float(metrics["loss"]), float(metrics["offset_mean"]),
                        float(new_state.params["embed"]["embedding"][0, 0])))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5)


def test_local_batch_names_missing_fields() -> None:
    with pytest.raises(KeyError, match="targets_weights"):
        local_batch(LmBatch, {k: np.zeros((2, 4)) for k in LmBatch.FIELDS if k != "targets_weights"})
