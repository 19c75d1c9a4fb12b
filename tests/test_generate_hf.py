"""Greedy parity with transformers: tiny random Llama and Mixtral models, converted by maxlm, complete a batch of
prompts of different lengths token for token like `generate(do_sample=False)` (left-padded batch there, right-padded
cache slots here)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest

from maxlm.convert.hf import from_hf
from maxlm.generate import Request
from maxlm.generate.cli import make_engine
from maxlm.generate.load import load_model
from test_convert import SHAPES as LLAMA_SHAPES, hf_llama
from test_convert_mixtral import SHAPES as MIXTRAL_SHAPES, hf_mixtral

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NEW = 12
LENGTHS = (5, 12, 8)


def hf_greedy(model, prompts: list[list[int]], pad_id: int) -> list[list[int]]:
    """transformers' greedy completions of a left-padded batch, cut at the first eos."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                             min_new_tokens=NEW, pad_token_id=pad_id, eos_token_id=None)
    return [row.tolist() for row in out[:, width:]]


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_greedy_equals_transformers_generate(tmp_path: Path, family: str) -> None:
    if family == "llama":
        model = hf_llama(tmp_path / "hf", **LLAMA_SHAPES["gqa-tied"])
    else:
        model = hf_mixtral(tmp_path / "hf", **MIXTRAL_SHAPES["gqa-untied"])
    assert_greedy_parity(model, tmp_path, seed=3)


def assert_greedy_parity(model, tmp_path: Path, seed: int) -> None:
    """maxlm's cached greedy completions of the HF model saved at tmp_path/hf equal transformers' generate."""
    vocab = model.config.vocab_size
    rs = np.random.RandomState(seed)
    prompts = [list(map(int, rs.randint(3, vocab, size=n))) for n in LENGTHS]
    want = hf_greedy(model, prompts, pad_id=0)

    step_dir, cfg = from_hf(str(tmp_path / "hf"), str(tmp_path / "ck"))
    cfg.load_parameters_from = step_dir
    cfg.generate.max_length = 64
    engine = make_engine(load_model(cfg), tokenizer=None)
    got = engine.generate([Request(p, NEW) for p in prompts])
    assert [c.completion_ids for c in got] == want


@pytest.mark.parametrize("name", ["llama3", "qwen2.5-yarn", "qwen3", "qwen3-moe", "mistral"])
def test_greedy_equals_transformers_generate_for_each_family(tmp_path: Path, name: str) -> None:
    """The families of maxlm.convert.families (RoPE scaling, q/k/v biases, QK-norm, Qwen3-MoE routing, a sliding
    window) decode with the KV cache exactly as transformers does; prompts + new tokens pass the RoPE threshold and
    the window of the test models (original context 16, window 8)."""
    from test_convert_families import hf_model

    assert_greedy_parity(hf_model(tmp_path / "hf", name), tmp_path, seed=5)
