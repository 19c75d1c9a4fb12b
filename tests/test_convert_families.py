"""The Hugging Face families people fine-tune, built tiny and random here (no download), one case each:

Llama 3.x (RoPE `llama3`), Qwen2.5 (q/k/v biases, YaRN), Qwen3 (QK-norm, linear RoPE), Qwen3-MoE (QK-norm, a dense
first layer, narrow experts, top-k without renormalisation) and Mistral (sliding window), plus Mixtral with a window.
For each: maxlm's logits equal transformers' (float32, eager attention) within 1e-4 on 48 random tokens, past
the RoPE scaling's original context (16) and past the sliding window (8); maxlm -> HF -> maxlm is bit-identical and
transformers reads the export with the same logits; `maxlm convert config` prints the model section. The MoE
family also loads onto an expert-parallel mesh through `model.from_hf`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from maxlm.config import ConfigError, load_config, resolve_config_path
from maxlm.convert.cli import main as convert_main
from maxlm.convert.hf import model_config_from_hf, resolve_model_from_hf
from maxlm.convert.params_store import model_config_from_meta
from maxlm.mesh import build_mesh, logical_rules
from maxlm.model import Decoder, abstract_params
from maxlm.train.checkpoint import load_parameters, read_meta
from maxlm.train.optimizer import make_optimizer
from maxlm.train.state import state_layout
from test_convert import apply, hf_logits, maxlm_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, T, ORIGINAL, WINDOW = 128, 48, 16, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": ORIGINAL}
YARN = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
FAMILIES = {  # name: (config class, kwargs, maxlm fields the conversion must produce)
    "llama3": ("LlamaConfig", dict(rope_parameters=LLAMA3, tie_word_embeddings=True),
               dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_positions=ORIGINAL)),
    "qwen2.5-yarn": ("Qwen2Config", dict(rope_parameters=YARN),
                     dict(qkv_bias=True, rope_scaling="yarn", rope_factor=4.0, sliding_window=0)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                                                "factor": 2.0}),
              dict(qk_norm=True, head_dim=16, rope_scaling="linear", rope_factor=2.0)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_hidden_layers=3, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=16, norm_topk_prob=False, mlp_only_layers=[0]),
                  dict(ffn="moe", qk_norm=True, num_experts=4, moe_ffn_dim=16, ffn_dim=48, router_renormalize=False,
                       first_dense_layers=1, moe_layer_interval=1)),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW), dict(sliding_window=WINDOW, rope_scaling="none")),
    "mixtral-window": ("MixtralConfig", dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
                       dict(ffn="moe", sliding_window=WINDOW, router_renormalize=True)),
}
IDS = np.random.RandomState(0).randint(0, VOCAB, size=(2, T))


def hf_model(path: Path, name: str, seed: int = 0):
    """A random float32 model of the family saved with `save_pretrained`. Every weight is random (norms around 1,
    biases included) so a swapped, mis-transposed or dropped tensor changes the logits; router weights are larger
    so the top-k choices are well separated and rounding never flips one."""
    cls, kw, _ = FAMILIES[name]
    cfg = getattr(transformers, cls)(**(COMMON | kw), attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            router = pname.endswith("mlp.gate.weight") or pname.endswith("block_sparse_moe.gate.weight")
            p.normal_(1.0 if "norm" in pname else 0.0, 1.0 if router else 0.2)
    model.save_pretrained(path)
    return model


def _restored(step_dir: Path) -> dict:
    cfg = model_config_from_meta(read_meta(str(step_dir)))
    return ocp.StandardCheckpointer().restore(str(step_dir / "params"), nn.unbox(abstract_params(cfg)))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_logits_and_round_trip(tmp_path: Path, name: str, capsys) -> None:
    model = hf_model(tmp_path / "hf", name)
    ref = hf_logits(model, IDS)
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ck"), "model.attention=xla"]) == 0
    m = model_config_from_meta(read_meta(str(tmp_path / "ck" / "0")))
    want = FAMILIES[name][2]
    assert {k: getattr(m, k) for k in want} == want
    ours = maxlm_logits(str(tmp_path / "ck" / "0"), IDS)
    print(f"{name}: max |logit difference| {np.max(np.abs(ours - ref)):.2e}")
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    # maxlm -> HF: transformers reads the export (its config class, its tensors) with the same logits ...
    assert convert_main(["to-hf", str(tmp_path / "ck"), str(tmp_path / "hf2")]) == 0
    exported = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert exported["model_type"] == json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(back, IDS), ref, atol=1e-5, rtol=0)
    # ... and HF -> maxlm gives back every parameter bit for bit, with the same model config.
    assert convert_main(["from-hf", str(tmp_path / "hf2"), str(tmp_path / "ck2"), "model.attention=xla"]) == 0
    assert model_config_from_meta(read_meta(str(tmp_path / "ck2" / "0"))) == m
    first, second = _restored(tmp_path / "ck" / "0"), _restored(tmp_path / "ck2" / "0")
    assert jax.tree_util.tree_structure(first) == jax.tree_util.tree_structure(second)
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # `maxlm convert config` prints the model section the conversion used.
    capsys.readouterr()
    assert convert_main(["config", str(tmp_path / "hf")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    assert all(printed.get(k, getattr(type(m)(), k)) == v for k, v in want.items())


def test_moe_family_loads_onto_expert_parallel_mesh_via_from_hf(tmp_path: Path) -> None:
    """`model.from_hf=DIR load_parameters_from=DIR` on a (data 2, fsdp 2, expert 2) mesh: no model YAML written;
    the experts are split over `expert`; fine-tuning's own balance coefficient (training-only) is kept."""
    model = hf_model(tmp_path / "hf", "qwen3-moe")
    overrides = [f"model.from_hf={tmp_path / 'hf'}", f"load_parameters_from={tmp_path / 'hf'}", "model.attention=xla",
                 "model.load_balance_coef=0.05", "model.router_z_coef=0"]
    cfg = resolve_model_from_hf(load_config(resolve_config_path("tiny-moe"), overrides), overrides)
    assert (cfg.model.num_experts, cfg.model.d_model, cfg.model.load_balance_coef) == (4, 32, 0.05)
    assert (cfg.mesh.expert, cfg.model.first_dense_layers) == (2, 1)
    mesh, rules = build_mesh(cfg), logical_rules(cfg)
    tx, _ = make_optimizer(cfg)
    layout = state_layout(cfg, Decoder(cfg.model), tx, mesh, rules)
    params = load_parameters(cfg.load_parameters_from, cfg, layout)
    gate = params["layers_group1"]["moe"]["gate"]
    assert gate.sharding == layout.shardings.params["layers_group1"]["moe"]["gate"]
    assert gate.sharding.spec[1] == "expert"  # [layers, E, D, F]: experts split over the expert axis
    np.testing.assert_allclose(apply(cfg.model, jax.device_get(params), IDS), hf_logits(model, IDS), atol=1e-4,
                               rtol=0)
    with pytest.raises(ConfigError, match=r"model.d_model=64 but config.json gives 32"):
        resolve_model_from_hf(load_config(resolve_config_path("tiny-moe"), overrides + ["model.d_model=64"]),
                              overrides + ["model.d_model=64"])


def test_unsupported_options_are_refused_in_one_line() -> None:
    base = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64}
    cases = [
        (base | {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}, "on 2 of 4 layers"),
        (base | {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "RoPE scaling 'dynamic'"),
        (base | {"model_type": "qwen3", "attention_bias": True}, "attention_bias=true"),
        (base | {"model_type": "llama", "attention_bias": True}, "attention_bias=true"),
        (base | {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        (base | {"model_type": "qwen3_moe", "mlp_only_layers": [2]}, "MoE layers [0, 1, 3]"),
    ]
    for hf, phrase in cases:
        with pytest.raises(ConfigError) as e:
            model_config_from_hf(hf)
        assert phrase in str(e.value) and "\n" not in str(e.value), str(e.value)
    # Sliding on every layer (max_window_layers 0) is maxlm's window; use_sliding_window false means none.
    assert model_config_from_hf(base | {"use_sliding_window": True, "sliding_window": 8,
                                        "max_window_layers": 0}).sliding_window == 8
    assert model_config_from_hf(base | {"sliding_window": 8}).sliding_window == 0
    assert model_config_from_hf(base | {"model_type": "mistral"}).sliding_window == 4096  # MistralConfig's default
    # A YaRN config without a factor takes max_position_embeddings / original, as transformers does.
    yarn = model_config_from_hf(base | {"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 16}})
    assert (yarn.rope_scaling, yarn.rope_factor, yarn.rope_original_max_positions) == ("yarn", 4.0, 16)
