"""KV-cached decoding equals uncached decoding (greedy, dense and MoE, scanned and unscanned, a sliding window, several
meshes); a batch of prompts of different lengths gives each row's tokens alone; no recompilation per token; stop on
eos / stop strings / the token limit per row; sampling: transformers' warpers, top-k support, top-p mass,
per-request seeds."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from maxlm.generate import Engine, Request, SamplingParams
from maxlm.generate.sampling import RowSampling, Warpers, next_tokens, warp
from maxlm.mesh import build_mesh, logical_rules, mesh_context
from maxlm.model import Decoder
from maxlm.train.optimizer import make_optimizer
from maxlm.train.state import init_state, state_layout

MAX_LEN = 48
PROMPT_LENS = (3, 11, 7)
NEW = 10

LAYOUTS = {  # name: overrides of the tiny config (mesh data x fsdp x tensor x expert over 8 devices)
    "dense-scan-dp2-fsdp2-tp2": [],
    "dense-unscanned-fsdp8": ["model.scan_layers=false", "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"],
    "sliding-window-4-dp8": ["model.sliding_window=4", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"],
    "moe-ep2-tp2": ["model.ffn=moe", "model.num_experts=4", "model.first_dense_layers=1", "mesh.data=1",
                    "mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2"],
}


def build(overrides: list[str]):
    cfg = tiny_config(*overrides)
    mesh, rules = build_mesh(cfg), logical_rules(cfg)
    model = Decoder(cfg.model)
    tx, _ = make_optimizer(cfg)
    layout = state_layout(cfg, model, tx, mesh, rules)
    params = init_state(cfg, model, tx, layout, mesh, rules, jax.random.key(1)).params
    return cfg, mesh, rules, params


def uncached_greedy(cfg, mesh, rules, params, prompt: list[int], n: int) -> list[int]:
    """The reference: the full forward pass over a fixed-length buffer for every token (causal attention makes the
    unwritten tail invisible), argmax at the last written position."""
    fwd = jax.jit(lambda p, x: Decoder(cfg.model).apply({"params": p}, x))
    buf = np.zeros((1, MAX_LEN), np.int32)
    buf[0, :len(prompt)] = prompt
    out = []
    with mesh_context(mesh, rules):
        for k in range(len(prompt), len(prompt) + n):
            tok = int(np.argmax(np.asarray(fwd(params, buf))[0, k - 1]))
            buf[0, k] = tok
            out.append(tok)
    return out


def prompts(vocab: int) -> list[list[int]]:
    rs = np.random.RandomState(0)
    return [list(map(int, rs.randint(4, vocab, size=n))) for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def setup(request):
    cfg, mesh, rules, params = build(LAYOUTS[request.param])
    engine = Engine(cfg.model, params, mesh, rules, eos_ids=[], max_length=MAX_LEN, batch_size=8)
    return cfg, mesh, rules, params, engine


def test_cached_equals_uncached_and_rows_alone(setup) -> None:
    cfg, mesh, rules, params, engine = setup
    ps = prompts(cfg.model.vocab_size)
    batch = engine.generate([Request(p, NEW) for p in ps])
    for p, c in zip(ps, batch):
        assert c.completion_ids == uncached_greedy(cfg, mesh, rules, params, p, NEW)
        assert c.finish_reason == "length" and c.prompt_tokens == len(p) and c.completion_tokens == NEW
    for p, c in zip(ps, batch):  # each row alone: same tokens as in the mixed-length batch
        assert engine.generate([Request(p, NEW)])[0].completion_ids == c.completion_ids
    # Streaming (one decode call per token) and running to the end share one prefill and one decode executable.
    seen: list[int] = []
    (streamed,) = engine.generate([Request(ps[0], NEW)], on_tokens=lambda i, ids: seen.append(len(ids)))
    assert streamed.completion_ids == batch[0].completion_ids and seen == list(range(1, NEW + 1))
    assert engine._prefill._cache_size() == 1 and engine._decode._cache_size() == 1


def test_rows_finish_independently_on_eos_limit_and_stop_string() -> None:
    cfg, mesh, rules, params = build(LAYOUTS["dense-scan-dp2-fsdp2-tp2"])
    letters = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731  a stand-in tokenizer
    engine = Engine(cfg.model, params, mesh, rules, eos_ids=[], max_length=MAX_LEN, decode_text=letters)
    ps = prompts(cfg.model.vocab_size)
    free = engine.generate([Request(p, NEW) for p in ps])
    eos = free[1].completion_ids[3]
    engine.eos_E = np.asarray([eos], np.int32)  # an argument of the compiled steps: no recompilation
    stop = letters(free[2].completion_ids)[5]
    out = engine.generate([Request(ps[0], 4), Request(ps[1], NEW), Request(ps[2], NEW, stop=(stop,))])

    def expected(ids: list[int], limit: int) -> tuple[list[int], str]:
        ids = ids[:limit]
        return (ids[:ids.index(eos)], "eos") if eos in ids else (ids, "length")

    assert (out[0].completion_ids, out[0].finish_reason) == expected(free[0].completion_ids, 4)
    assert (out[1].completion_ids, out[1].finish_reason) == expected(free[1].completion_ids, NEW)
    assert out[1].finish_reason == "eos"
    cut = letters(free[2].completion_ids).index(stop)
    assert out[2].finish_reason == "stop" and out[2].text == letters(free[2].completion_ids)[:cut]
    assert out[2].completion_ids == free[2].completion_ids[:cut + 1]
    assert engine._prefill._cache_size() == 1 and engine._decode._cache_size() == 1

    # Sampling: a request's tokens depend on its seed only, not on the batch it shares.
    s = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=7)
    alone = engine.generate([Request(ps[1], NEW, s)])[0].completion_ids
    mixed = engine.generate([Request(ps[0], NEW, dataclasses.replace(s, seed=1)), Request(ps[1], NEW, s),
                             Request(ps[2], NEW)])
    assert mixed[1].completion_ids == alone
    other = engine.generate([Request(ps[1], NEW, dataclasses.replace(s, seed=8))])[0].completion_ids
    assert other != alone


def test_warpers_equal_transformers() -> None:
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rs = np.random.RandomState(0)
    settings = [SamplingParams(0.7, 5, 1.0, 0.0), SamplingParams(1.3, 0, 0.8, 0.0), SamplingParams(1.0, 0, 1.0, 0.2),
                SamplingParams(0.5, 10, 0.6, 0.05), SamplingParams(2.0, 3, 0.95, 0.3), SamplingParams(1.0, 0, 1.0, 0)]
    logits = rs.randn(len(settings), 64).astype(np.float32) * 3
    ours = np.asarray(warp(jnp.asarray(logits), RowSampling.of(settings), Warpers(True, True, True, True)))
    for row, s in enumerate(settings):
        procs = []  # transformers' order (generation/utils.py _get_logits_processor)
        if s.temperature != 1.0:
            procs.append(lp.TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            procs.append(lp.TopKLogitsWarper(s.top_k))
        if s.top_p < 1:
            procs.append(lp.TopPLogitsWarper(s.top_p))
        if s.min_p:
            procs.append(lp.MinPLogitsWarper(s.min_p))
        x = torch.tensor(logits[row:row + 1])
        for p in procs:
            x = p(None, x)
        ref = x.numpy()[0]
        np.testing.assert_array_equal(np.isinf(ours[row]), np.isinf(ref))
        np.testing.assert_allclose(ours[row][~np.isinf(ref)], ref[~np.isinf(ref)], rtol=1e-6)


def _draws(logits_V: np.ndarray, s: SamplingParams, n: int) -> np.ndarray:
    rows = [dataclasses.replace(s, seed=i) for i in range(n)]
    fn = jax.jit(lambda x, r: next_tokens(x, r, Warpers.of(rows), jnp.zeros((n,), jnp.int32)))
    return np.asarray(fn(jnp.broadcast_to(jnp.asarray(logits_V), (n, logits_V.size)), RowSampling.of(rows)))


def test_top_k_support_and_top_p_mass() -> None:
    rs = np.random.RandomState(1)
    logits = rs.randn(40).astype(np.float32) * 2
    n = 4000
    k_draws = _draws(logits, SamplingParams(temperature=1.0, top_k=5), n)
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert set(k_draws.tolist()) <= top5 and len(set(k_draws.tolist())) == 5
    p_draws = _draws(logits, SamplingParams(temperature=1.0, top_p=0.6), n)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = order[:np.searchsorted(np.cumsum(probs[order]), 0.6) + 1]  # the smallest set with mass >= 0.6
    assert set(p_draws.tolist()) == set(nucleus.tolist())
    want = probs[nucleus] / probs[nucleus].sum()
    got = np.array([(p_draws == t).mean() for t in nucleus])
    np.testing.assert_allclose(got, want, atol=4 * np.sqrt(want * (1 - want) / n).max())
