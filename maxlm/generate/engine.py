"""Batched decoding with a KV cache: one prefill of the batch's prompts, then one token per step in a jitted loop.

Compiles: the prefill once per (rows, prompt-length bucket, completion bucket, warpers) and the decode loop once
per (rows, cache length, warpers); the number of steps a decode call runs is a traced argument, so streaming one
token at a time and running to the end in one call share a single executable, and no token ever recompiles.
Prompt lengths round up to a power of two (at least 16), completion budgets too, and rows to a multiple of the
data-parallel size (padding rows finish at once).

The decode loop is a `lax.while_loop` over a donated `DecodeState` (cache and token buffer are updated in place);
it stops when every row is done or after the requested number of steps. Rows finish independently: on an eos id,
at their own token limit, or when the host sees one of their stop strings (checked between calls).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxlm.config import ConfigError, ModelConfig
from maxlm.generate.sampling import RowSampling, SamplingParams, Warpers, next_tokens
from maxlm.mesh import LogicalRules, mesh_context
from maxlm.model import Decoder
from maxlm.model.heads import lm_logits
from maxlm.model.kv_cache import cache_logical_axes, init_cache
from maxlm.model.layers import compute_dtype

MIN_BUCKET = 16
STOP_CHECK_STEPS = 16  # decode steps between host checks for stop strings


@dataclass
class Request:
    """One prompt to complete. `stop`: strings that end the completion (the text stops before them)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    """`finish_reason`: eos (an end-of-sequence id, not included in the ids), stop (a stop string; the ids run to
    the token that completed it, the text stops before it) or length (the token limit)."""

    completion_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    text: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.completion_ids)


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries, all on device. `last_B` is the token to feed next, at position
    `pos_B`; `count_B` tokens of each row are in `tokens_BN`."""

    cache: Any
    last_B: jax.Array
    pos_B: jax.Array
    tokens_BN: jax.Array
    count_B: jax.Array
    done_B: jax.Array


def row_sharding(mesh: Mesh, rules: LogicalRules, *trailing: None) -> NamedSharding:
    """Rows over the data-parallel axes (`act_batch`), any trailing dimensions replicated."""
    return NamedSharding(mesh, P(nn.logical_to_mesh_axes(("act_batch",), rules)[0], *trailing))


def data_parallel_size(mesh: Mesh, rules: LogicalRules) -> int:
    """How many ways rows are split: a decoding batch is padded to a multiple of it."""
    spec = row_sharding(mesh, rules).spec[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return math.prod(mesh.shape[a] for a in axes)


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The padded size for n: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def check_requests(requests: Sequence[Request], max_length: int, vocab_size: int) -> None:
    """Every request fits the context and the vocabulary: one line naming the first that does not."""
    for i, r in enumerate(requests):
        if not r.prompt_ids:
            raise ConfigError(f"prompt {i} is empty; give at least one token")
        if len(r.prompt_ids) >= max_length:
            raise ConfigError(f"prompt {i} has {len(r.prompt_ids)} tokens, too long for the context of {max_length} "
                              f"tokens (generate.max_length, 0: data.seq_len), which must leave room for one more")
        if r.max_new_tokens < 1:
            raise ConfigError(f"prompt {i}: max_new_tokens must be >= 1, got {r.max_new_tokens}")
        bad = [t for t in r.prompt_ids if not 0 <= t < vocab_size]
        if bad:
            raise ConfigError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


class Engine:
    """Generates completions for requests with the given parameters (already on their shards)."""

    def __init__(self, cfg: ModelConfig, params: Any, mesh: Mesh, rules: LogicalRules, *, eos_ids: Sequence[int],
                 max_length: int, batch_size: int = 32, pad_id: int = 0,
                 decode_text: Callable[[list[int]], str] | None = None) -> None:
        self.cfg, self.params, self.mesh, self.rules = cfg, params, mesh, rules
        self.model = Decoder(cfg)
        self.max_length, self.batch_size, self.pad_id = max_length, batch_size, pad_id
        self.decode_text = decode_text
        # Filled when `record_timings` is set (maxlm bench-generate): per batch, seconds of prefill and of decoding.
        self.record_timings = False
        self.timings: list[dict[str, float]] = []
        self.eos_E = np.asarray(sorted(set(eos_ids)) or [-1], np.int32)
        self.dp = data_parallel_size(mesh, rules)
        rows, rows2 = row_sharding(mesh, rules), row_sharding(mesh, rules, None)
        cache_sh = nn.logical_to_mesh_sharding(cache_logical_axes(cfg), mesh, rules)
        self.state_shardings = DecodeState(cache=cache_sh, last_B=rows, pos_B=rows, tokens_BN=rows2, count_B=rows,
                                           done_B=rows)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("which", "cache_len"),
                                out_shardings=self.state_shardings)
        self._decode = jax.jit(self._decode_fn, static_argnames=("which",), donate_argnums=(1,),
                               out_shardings=self.state_shardings)

    # ------------------------------------------------------------------------------------------------------
    # Device side

    def _prefill_fn(self, params: Any, ids_BP: jax.Array, lengths_B: jax.Array, max_new_B: jax.Array,
                    rows: RowSampling, eos_E: jax.Array, *, which: Warpers, cache_len: int) -> DecodeState:
        B, T = ids_BP.shape
        n_buf = cache_len - T
        cache = init_cache(self.cfg, B, cache_len, compute_dtype(self.cfg))
        positions_BP = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BPD, cache = self.model.apply({"params": params}, ids_BP, jnp.ones_like(ids_BP), positions_BP,
                                        hidden_only=True, cache=cache)
        # The LM head only where the next token is read (each prompt's last position), not over all P positions.
        x_B1D = jnp.take_along_axis(x_BPD, (lengths_B - 1)[:, None, None], axis=1)
        logits_BV = lm_logits(self.cfg, params, x_B1D)[:, 0]
        zero_B = jnp.zeros((B,), jnp.int32)
        tok_B = next_tokens(logits_BV, rows, which, zero_B)
        tokens_BN = jnp.zeros((B, n_buf), jnp.int32).at[:, 0].set(tok_B)
        done_B = jnp.isin(tok_B, eos_E) | (max_new_B <= 1)
        return DecodeState(cache=cache, last_B=tok_B, pos_B=lengths_B, tokens_BN=tokens_BN, count_B=zero_B + 1,
                           done_B=done_B)

    def _decode_fn(self, params: Any, state: DecodeState, max_new_B: jax.Array, rows: RowSampling,
                   eos_E: jax.Array, stop_B: jax.Array, steps: jax.Array, *, which: Warpers) -> DecodeState:
        state = state.replace(done_B=state.done_B | stop_B)
        B, N = state.tokens_BN.shape
        row_B = jnp.arange(B)

        def cond(carry: tuple[jax.Array, DecodeState]) -> jax.Array:
            i, s = carry
            return (i < steps) & ~jnp.all(s.done_B)

        def body(carry: tuple[jax.Array, DecodeState]) -> tuple[jax.Array, DecodeState]:
            i, s = carry
            logits_B1V, cache = self.model.apply({"params": params}, s.last_B[:, None], jnp.ones((B, 1), jnp.int32),
                                                 s.pos_B[:, None], cache=s.cache)
            tok_B = next_tokens(logits_B1V[:, 0], rows, which, s.count_B)
            active_B = ~s.done_B
            # Finished rows keep stepping (the batch moves together) but write nothing: their index is dropped.
            tokens_BN = s.tokens_BN.at[row_B, jnp.where(active_B, s.count_B, N)].set(tok_B, mode="drop")
            count_B = s.count_B + active_B
            done_B = s.done_B | (active_B & (jnp.isin(tok_B, eos_E) | (count_B >= max_new_B)))
            return i + 1, DecodeState(cache=cache, last_B=tok_B, pos_B=s.pos_B + 1, tokens_BN=tokens_BN,
                                      count_B=count_B, done_B=done_B)

        _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
        return state

    # ------------------------------------------------------------------------------------------------------
    # Host side

    def check(self, requests: Sequence[Request]) -> None:
        check_requests(requests, self.max_length, self.cfg.vocab_size)

    def generate(self, requests: Sequence[Request],
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> list[Completion]:
        """Completions in the order of `requests`. Prompts are grouped by length into batches of at most
        `batch_size` rows. `on_tokens(request index, ids so far)` is called after every step (streaming); it
        forces one decode step per call, so use it for interactive single prompts."""
        self.check(requests)
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
        out: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            cb = None if on_tokens is None else (lambda j, ids, idx=idx: on_tokens(idx[j], ids))
            for j, c in zip(idx, self._generate_batch([requests[i] for i in idx], cb)):
                out[j] = c
        return out  # type: ignore[return-value]

    def _generate_batch(self, reqs: list[Request], on_tokens: Callable[[int, list[int]], None] | None
                        ) -> list[Completion]:
        n = len(reqs)
        B = self.dp * bucket(math.ceil(n / self.dp), 1)
        budget_b = [min(r.max_new_tokens, self.max_length - len(r.prompt_ids)) for r in reqs]
        T = min(bucket(max(len(r.prompt_ids) for r in reqs)), self.max_length)
        n_buf = bucket(max(budget_b))
        ids = np.full((B, T), self.pad_id, np.int32)
        lengths = np.ones((B,), np.int32)
        max_new = np.ones((B,), np.int32)
        for b, r in enumerate(reqs):
            ids[b, :len(r.prompt_ids)] = r.prompt_ids
            lengths[b], max_new[b] = len(r.prompt_ids), budget_b[b]
        params = [r.sampling for r in reqs] + [SamplingParams()] * (B - n)
        which, rows = Warpers.of(params), RowSampling.of(params)
        stops = [r.stop for r in reqs]
        streaming = on_tokens is not None
        with mesh_context(self.mesh, self.rules):
            t0 = time.perf_counter()
            state = self._prefill(self.params, ids, lengths, max_new, rows, self.eos_E, which=which,
                                  cache_len=T + n_buf)
            if self.record_timings:
                jax.block_until_ready(state)
                t1 = time.perf_counter()
            stopped = np.zeros((B,), bool)
            while True:
                done, count, tokens = jax.device_get((state.done_B, state.count_B, state.tokens_BN))
                if streaming:
                    for b in range(n):
                        on_tokens(b, [int(t) for t in tokens[b, :count[b]]])
                newly = self._stop_strings(stops, tokens, count, stopped) if any(stops) else np.zeros((B,), bool)
                stopped |= newly
                if np.all(done[:n] | stopped[:n]):
                    break
                steps = 1 if streaming else STOP_CHECK_STEPS if any(stops) else n_buf
                state = self._decode(self.params, state, max_new, rows, self.eos_E, stopped, np.int32(steps),
                                     which=which)
        if self.record_timings:
            self.timings.append({"rows": n, "padded_rows": B, "prompt_tokens": int(lengths[:n].sum()),
                                 "prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1,
                                 "decode_steps": int(count[:n].max()) - 1})
        return [self._completion(reqs[b], tokens[b, :count[b]], bool(stopped[b])) for b in range(n)]

    def _stop_strings(self, stops: list[tuple[str, ...]], tokens: np.ndarray, count: np.ndarray,
                      already: np.ndarray) -> np.ndarray:
        hit = np.zeros((tokens.shape[0],), bool)
        for b, ss in enumerate(stops):
            if ss and not already[b]:
                text = self._text(tokens[b, :count[b]])
                hit[b] = any(s in text for s in ss)
        return hit

    def _text(self, ids: Sequence[int]) -> str:
        if self.decode_text is None:
            raise ConfigError("stop strings need a tokenizer to decode the completion (set data.tokenizer)")
        return self.decode_text([int(t) for t in ids])

    def _completion(self, req: Request, ids: np.ndarray, stopped: bool) -> Completion:
        ids_l = [int(t) for t in ids]
        if stopped:
            # The shortest prefix whose text holds a stop string; the text stops before the string.
            for k in range(1, len(ids_l) + 1):
                text = self._text(ids_l[:k])
                cut = min((text.index(s) for s in req.stop if s in text), default=-1)
                if cut >= 0:
                    return Completion(ids_l[:k], "stop", len(req.prompt_ids), text[:cut])
        if ids_l and ids_l[-1] in set(self.eos_E.tolist()):
            reason, ids_l = "eos", ids_l[:-1]
        else:
            reason = "length"
        text = self.decode_text(ids_l) if self.decode_text else None
        return Completion(ids_l, reason, len(req.prompt_ids), text)
