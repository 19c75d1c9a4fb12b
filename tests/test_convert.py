"""Hugging Face Llama <-> maxlm: logits match transformers (float32, eager attention) on random tokens for MHA and
GQA, tied and untied, several RoPE thetas, scanned and unscanned; maxlm -> HF -> maxlm is bit-identical;
`load_parameters_from` a Hugging Face directory; config mapping and its errors."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import tiny_config
from maxlm.config import ConfigError
from maxlm.convert.cli import main as convert_main, parse_size
from maxlm.convert.families import model_config_from_hf
from maxlm.convert.hf import from_hf, to_hf
from maxlm.convert.layout import param_leaves
from maxlm.convert.params_store import model_config_from_meta
from maxlm.convert.safetensors_io import INDEX_FILE, SafetensorsReader
from maxlm.mesh import build_mesh, logical_rules
from maxlm.model import Decoder, abstract_params
from maxlm.checkpoint_format import read_meta
from maxlm.train.checkpoint import Checkpointer, load_parameters
from maxlm.train.optimizer import make_optimizer
from maxlm.train.state import init_state, state_layout

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHAPES = {  # name: LlamaConfig kwargs
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0),
    "mqa-headdim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
                        rope_theta=1234.5),
}


def hf_llama(path: Path, seed: int = 0, **kw) -> "transformers.LlamaForCausalLM":
    """A random float32 Llama saved as safetensors; every weight (norms included) is random so that a swapped or
    mis-transposed tensor changes the logits."""
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   rms_norm_eps=1e-5, attn_implementation="eager", **kw)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(path)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def maxlm_logits(step_dir: str, ids: np.ndarray) -> np.ndarray:
    """Restores a converted checkpoint's params with orbax itself (not the converter's reader) and runs maxlm."""
    model_cfg = model_config_from_meta(read_meta(step_dir))
    abstract = nn.unbox(abstract_params(model_cfg))
    params = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "params"), abstract)
    return apply(model_cfg, params, ids)


def apply(model_cfg, params, ids: np.ndarray) -> np.ndarray:
    """maxlm's logits in float32 (compared with transformers' float32), jitted (one compile, not one per op)."""
    f32 = dataclasses.replace(model_cfg, dtype="float32")
    return np.asarray(jax.jit(lambda p, x: Decoder(f32).apply({"params": p}, x))(params, jnp.asarray(ids)))


IDS = np.random.RandomState(0).randint(0, 96, size=(2, 24))


@pytest.mark.parametrize("name", list(SHAPES))
def test_from_hf_logits_match_transformers(tmp_path: Path, name: str) -> None:
    model = hf_llama(tmp_path / "hf", **SHAPES[name])
    ref = hf_logits(model, IDS)
    step_dir, cfg = from_hf(str(tmp_path / "hf"), str(tmp_path / "ck"))
    assert cfg.model.rope_theta == SHAPES[name]["rope_theta"] and cfg.model.tie_embeddings == SHAPES[name][
        "tie_word_embeddings"]
    np.testing.assert_allclose(maxlm_logits(step_dir, IDS), ref, atol=1e-4, rtol=0)
    # Unscanned layers hold the same numbers in another layout.
    flat_dir, _ = from_hf(str(tmp_path / "hf"), str(tmp_path / "flat"), ["model.scan_layers=false"])
    np.testing.assert_allclose(maxlm_logits(flat_dir, IDS), ref, atol=1e-4, rtol=0)


def _saved_maxlm_state(tmp_path: Path, *overrides: str):
    cfg = tiny_config(f"run_dir={tmp_path}/run", *overrides)
    mesh, rules = build_mesh(cfg), logical_rules(cfg)
    model = Decoder(cfg.model)
    tx, _ = make_optimizer(cfg)
    layout = state_layout(cfg, model, tx, mesh, rules)
    state = init_state(cfg, model, tx, layout, mesh, rules, jax.random.key(3))
    with Checkpointer(cfg, mesh) as ckpt:
        ckpt.save(5, state, jax.random.key(0), None)
    return cfg, jax.device_get(state.params)


def assert_imports_bit_identical(tmp_path: Path, model_cfg, params) -> None:
    """`maxlm convert from-hf` of `tmp_path/hf`, scanned and unscanned, gives back `params` bit for bit."""
    leaves = {leaf.path: leaf for leaf in param_leaves(model_cfg)}
    for scan in ("true", "false"):
        out = tmp_path / f"back-{scan}"
        assert convert_main(["from-hf", str(tmp_path / "hf"), str(out), f"model.scan_layers={scan}"]) == 0
        back = model_config_from_meta(read_meta(str(out / "0")))
        restored = ocp.StandardCheckpointer().restore(str(out / "0" / "params"), nn.unbox(abstract_params(back)))
        for leaf in param_leaves(back):
            got = np.asarray(_get(restored, leaf.path))
            for j, (layer, local) in enumerate(leaf.units()):
                np.testing.assert_array_equal(got[j] if leaf.stacked else got, _unit(params, leaves, layer, local))


def test_maxlm_to_hf_to_maxlm_is_bit_identical(tmp_path: Path) -> None:
    cfg, params = _saved_maxlm_state(tmp_path)
    # Through the `maxlm convert` command; small shards exercise the sharded layout and its index.
    assert convert_main(["to-hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--max-shard-size", "20000"]) == 0
    assert len(json.loads((tmp_path / "hf" / INDEX_FILE).read_text())["weight_map"]) == 3 + 9 * 2
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = IDS % cfg.model.vocab_size
    np.testing.assert_allclose(hf_logits(hf, ids), apply(cfg.model, params, ids), atol=1e-4, rtol=0)
    assert_imports_bit_identical(tmp_path, cfg.model, params)
    # The unscanned checkpoint exports to the same tensors as the scanned one, also when large tensors (here all
    # above 1 kB: the embedding, lm_head, MLP weights) go through in row blocks; and they come back the same.
    to_hf(str(tmp_path / "back-false"), str(tmp_path / "hf2"), block_bytes=1000)
    first, second = SafetensorsReader(str(tmp_path / "hf")), SafetensorsReader(str(tmp_path / "hf2"))
    assert first.keys() == second.keys()
    for name in first.keys():
        np.testing.assert_array_equal(first.read(name), second.read(name))
    blocked, _ = from_hf(str(tmp_path / "hf2"), str(tmp_path / "blocked"), block_bytes=1000)
    restored = ocp.StandardCheckpointer().restore(os.path.join(blocked, "params"), nn.unbox(abstract_params(cfg.model)))
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _unit(params, leaves, layer, local):
    for leaf in leaves.values():
        if leaf.local == local and (layer in leaf.layers if layer is not None else not leaf.layers):
            x = np.asarray(_get(params, leaf.path))
            return x[leaf.layers.index(layer)] if leaf.stacked else x
    raise KeyError((layer, local))


def test_bfloat16_export_and_import(tmp_path: Path) -> None:
    cfg, params = _saved_maxlm_state(tmp_path)
    to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    step_dir, _ = from_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), ["model.param_dtype=bfloat16"])
    model_cfg = model_config_from_meta(read_meta(step_dir))
    restored = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "params"),
                                                  nn.unbox(abstract_params(model_cfg)))
    want = np.asarray(params["layers"]["mlp"]["gate"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(restored["layers"]["mlp"]["gate"]), want)


def test_load_parameters_from_hf_directory(tmp_path: Path) -> None:
    model = hf_llama(tmp_path / "hf", **SHAPES["gqa-tied"])
    hf_model_cfg = model_config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    overrides = [f"model.{k}={getattr(hf_model_cfg, k)}" for k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                                                  "n_kv_heads", "ffn_dim", "rope_theta", "norm_eps",
                                                                  "tie_embeddings")]
    cfg = tiny_config(*overrides, f"load_parameters_from={tmp_path / 'hf'}")  # mesh (2, 2, 2)
    mesh, rules = build_mesh(cfg), logical_rules(cfg)
    tx, _ = make_optimizer(cfg)
    layout = state_layout(cfg, Decoder(cfg.model), tx, mesh, rules)
    params = load_parameters(cfg.load_parameters_from, cfg, layout)
    assert params["layers"]["attn"]["q"].sharding == layout.shardings.params["layers"]["attn"]["q"]
    np.testing.assert_allclose(apply(cfg.model, jax.device_get(params), IDS), hf_logits(model, IDS), atol=1e-4,
                               rtol=0)
    wrong = tiny_config(*overrides, "model.d_model=64", "model.n_layers=2")
    with pytest.raises(ConfigError) as e:
        load_parameters(str(tmp_path / "hf"), wrong, state_layout(wrong, Decoder(wrong.model), tx, mesh, rules))
    msg = str(e.value)
    assert "hidden_size=32 there but model.d_model=64 here" in msg and "num_hidden_layers=3 there" in msg
    assert "maxlm convert config" in msg and "\n" not in msg


def test_config_mapping_and_unsupported_features(tmp_path: Path, capsys) -> None:
    hf = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 8, "intermediate_size": 128, "rope_theta": 5e5, "tie_word_embeddings": True}
    m = model_config_from_hf(hf)  # transformers 4.x layout: rope_theta at the top, kv heads and head_dim implied
    assert (m.n_kv_heads, m.head_dim, m.rope_theta, m.norm_eps, m.tie_embeddings) == (8, 8, 5e5, 1e-6, True)
    v5 = hf | {"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}, "num_key_value_heads": 2}
    assert model_config_from_hf(v5).rope_theta == 1e4 and model_config_from_hf(v5).n_kv_heads == 2
    with pytest.raises(ConfigError, match="RoPE scaling 'llama3' without low_freq_factor, high_freq_factor"):
        model_config_from_hf(hf | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ConfigError, match="RoPE scaling 'longrope'"):
        model_config_from_hf(hf | {"rope_scaling": {"rope_type": "longrope", "factor": 8.0}})
    with pytest.raises(ConfigError, match="attention_bias=true"):
        model_config_from_hf(hf | {"attention_bias": True})
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        model_config_from_hf({"model_type": "gpt2"})
    hf_llama(tmp_path / "hf", **SHAPES["mha-untied"])
    assert convert_main(["config", str(tmp_path / "hf")]) == 0
    assert "d_model: 32" in capsys.readouterr().out
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "hf")]) == 2  # not an empty directory
    assert "is not empty" in capsys.readouterr().err
    assert parse_size("5GB") == 5 * 2**30 and parse_size("500MiB") == 500 * 2**20 and parse_size("123") == 123
