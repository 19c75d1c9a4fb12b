"""Log-likelihood of continuations given contexts, batched: what multiple-choice tasks and lm-evaluation-harness's
`loglikelihood` / `loglikelihood_rolling` requests ask of a model.

A request (context ids, continuation ids) is scored as in lm-evaluation-harness (lm_eval/models/huggingface.py,
`_loglikelihood_tokens`): the tokens context + continuation, cut from the left to max_length + 1, are fed shifted
by one; the result is the sum of log p(continuation token | everything before it) and whether every continuation
token is the argmax ("is_greedy"). Rows are sorted by length, padded to a power-of-two bucket and to a multiple of
the data-parallel size, so a file of mixed lengths compiles a handful of shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.generate.engine import bucket, data_parallel_size, row_sharding
from maxlm.generate.load import LoadedModel
from maxlm.mesh import mesh_context
from maxlm.model import Decoder


class Scorer:
    """Sums of continuation log-probabilities under a loaded model."""

    def __init__(self, loaded: LoadedModel, batch_size: int, max_length: int) -> None:
        self.loaded, self.max_length = loaded, max_length
        self.dp = data_parallel_size(loaded.mesh, loaded.rules)
        self.batch_size = -(-batch_size // self.dp) * self.dp
        model = Decoder(loaded.cfg.model)

        def score(params: Any, inputs_BT: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
            logits_BTV = model.apply({"params": params}, inputs_BT)
            logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
            tok_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
            greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
            return jnp.sum(tok_BT * mask_BT, axis=-1), jnp.all(greedy_BT | (mask_BT == 0), axis=-1)

        self._score = jax.jit(score)
        self._sharding = row_sharding(loaded.mesh, loaded.rules, None)

    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probs, is_greedy) per (context ids, continuation ids); the context must not be empty."""
        rows = []
        for ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("loglikelihood: context and continuation need at least one token each")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            T = min(bucket(len(rows[idx[0]][0])), self.max_length)
            B = self.dp * bucket(-(-len(idx) // self.dp), 1)
            inputs, targets, mask = (np.zeros((B, T), np.int32) for _ in range(3))
            for b, i in enumerate(idx):
                x, y, n = rows[i]
                inputs[b, :len(x)], targets[b, :len(y)] = x, y
                mask[b, len(y) - n:len(y)] = 1
            with mesh_context(self.loaded.mesh, self.loaded.rules):
                arrays = [jax.device_put(a, self._sharding) for a in (inputs, targets, mask)]
                ll, greedy = jax.device_get(self._score(self.loaded.params, *arrays))
            for b, i in enumerate(idx):
                out[i] = (float(ll[b]), bool(greedy[b]))
        return out


def split_continuation(encode: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's `_encode_pair`: trailing whitespace of the context moves to the continuation, the
    pair is encoded whole, and the continuation is what follows the context's own encoding (so a merge across the
    boundary is counted in the continuation, as the harness does)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(encode(context + continuation))
    ctx = list(encode(context))
    return ctx, whole[len(ctx):]
