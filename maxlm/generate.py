"""Greedy / sampled decoding with a plain uncached loop (a KV cache comes with the generation issue).

The buffer has a fixed length so the forward pass compiles once; causal attention makes the not-yet-written
positions invisible to earlier ones, so reading the logits at position n-1 is exact.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.mesh import LogicalRules, mesh_context
from maxlm.model import Decoder


def generate(model: Decoder, params: Any, prompt_ids: list[int], max_new_tokens: int, *, mesh: jax.sharding.Mesh,
             rules: LogicalRules, temperature: float = 0.0, eos_id: int | None = None, seed: int = 0) -> list[int]:
    """Returns the generated ids (prompt excluded). temperature 0 is greedy."""
    total = len(prompt_ids) + max_new_tokens

    @jax.jit
    def next_logits(p: Any, ids_1T: jax.Array, n: jax.Array) -> jax.Array:
        logits_1TV = model.apply({"params": p}, ids_1T)
        return jax.lax.dynamic_index_in_dim(logits_1TV[0], n - 1, keepdims=False)

    buf = np.zeros((1, total), np.int32)
    buf[0, : len(prompt_ids)] = prompt_ids
    rng = jax.random.key(seed)
    out: list[int] = []
    with mesh_context(mesh, rules):
        for n in range(len(prompt_ids), total):
            logits_V = next_logits(params, jnp.asarray(buf), jnp.int32(n))
            if temperature > 0:
                rng, sub = jax.random.split(rng)
                tok = int(jax.random.categorical(sub, logits_V / temperature))
            else:
                tok = int(jnp.argmax(logits_V))
            buf[0, n] = tok
            out.append(tok)
            if eos_id is not None and tok == eos_id:
                break
    return out
