"""Hugging Face Mixtral <-> maxlm: logits match transformers (float32, eager attention, maxlm's dropless MoE path)
for GQA untied and MQA tied models, scanned and unscanned; `load_parameters_from` a Mixtral directory onto an
expert-parallel mesh; maxlm -> HF -> maxlm is bit-identical and transformers loads the export with the same logits;
config mapping and what Mixtral cannot represent, in both directions.

Hugging Face's load-balancing loss against maxlm's is tests/test_moe.py::test_load_balance_loss_equals_hugging_face.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import numpy as np
import pytest

from maxlm.config import ConfigError, load_config, resolve_config_path
from maxlm.convert.cli import main as convert_main, model_overrides
from maxlm.convert.families import model_config_from_hf
from maxlm.convert.hf import from_hf, hf_config_from_model, to_hf
from maxlm.convert.params_store import model_config_from_meta
from maxlm.convert.safetensors_io import INDEX_FILE, SafetensorsReader
from maxlm.mesh import build_mesh, logical_rules
from maxlm.model import Decoder
from maxlm.checkpoint_format import read_meta
from maxlm.train.checkpoint import load_parameters
from maxlm.train.optimizer import make_optimizer
from maxlm.train.state import state_layout
from test_convert import _saved_maxlm_state, apply, assert_imports_bit_identical, hf_logits, maxlm_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 128
SHAPES = {  # name: MixtralConfig kwargs
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mqa-tied-headdim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                             rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}),
}
IDS = np.random.RandomState(0).randint(0, VOCAB, size=(2, 24))


def hf_mixtral(path: Path, seed: int = 0, **kw) -> "transformers.MixtralForCausalLM":
    """A random float32 Mixtral (4 experts, top 2) saved with `save_pretrained`. Every weight is random (norms
    around 1) so that a swapped expert, a gate/up mix-up or a missing transpose changes the logits; router weights
    are larger so that the top-2 choices are well separated and rounding never flips one."""
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
                                     router_aux_loss_coef=0.02, attn_implementation="eager", **kw)
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 1.0 if name.endswith("mlp.gate.weight") else 0.2)
    model.save_pretrained(path)
    return model


def test_save_pretrained_writes_per_expert_tensors(tmp_path: Path) -> None:
    """What the table reads: transformers fuses experts in memory but writes Mixtral's original per-expert names."""
    hf_mixtral(tmp_path / "hf", **SHAPES["gqa-untied"])
    names = SafetensorsReader(str(tmp_path / "hf")).keys()
    moe = "model.layers.1.block_sparse_moe."
    assert {moe + "gate.weight"} | {f"{moe}experts.3.w{j}.weight" for j in (1, 2, 3)} <= set(names)
    assert not any("gate_up_proj" in n or ".mlp." in n for n in names)


@pytest.mark.parametrize("name", list(SHAPES))
def test_from_hf_logits_match_transformers(tmp_path: Path, name: str) -> None:
    model = hf_mixtral(tmp_path / "hf", **SHAPES[name])
    ref = hf_logits(model, IDS)
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ck"), "model.attention=xla"]) == 0
    step_dir = str(tmp_path / "ck" / "0")
    m = model_config_from_meta(read_meta(step_dir))
    assert (m.ffn, m.num_experts, m.experts_per_token, m.moe_ffn_dim, m.capacity_factor) == ("moe", 4, 2, 48, 0.0)
    assert (m.load_balance_coef, m.tie_embeddings) == (0.02, SHAPES[name]["tie_word_embeddings"])
    np.testing.assert_allclose(maxlm_logits(step_dir, IDS), ref, atol=1e-4, rtol=0)
    if name != "gqa-untied":
        return
    # Unscanned layers hold the same numbers in another layout.
    flat_dir, _ = from_hf(str(tmp_path / "hf"), str(tmp_path / "flat"), ["model.scan_layers=false",
                                                                         "model.attention=xla"])
    np.testing.assert_allclose(maxlm_logits(flat_dir, IDS), ref, atol=1e-4, rtol=0)
    # A run loads the Hugging Face directory directly, experts split over the mesh's expert axis (data 2, fsdp 2,
    # expert 2); the overrides are the ones `maxlm convert from-hf` prints, then fine-tuning's own balance
    # coefficient and router noise (training-only keys, which need not match the checkpoint's).
    overrides = model_overrides(model_config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text())))
    cfg = load_config(resolve_config_path("tiny-moe"), overrides + ["model.attention=xla", "model.router_z_coef=0",
                                                                    "model.load_balance_coef=0.05",
                                                                    "model.router_jitter=0.01",
                                                                    f"load_parameters_from={tmp_path / 'hf'}"])
    mesh, rules = build_mesh(cfg), logical_rules(cfg)
    tx, _ = make_optimizer(cfg)
    layout = state_layout(cfg, Decoder(cfg.model), tx, mesh, rules)
    params = load_parameters(cfg.load_parameters_from, cfg, layout)
    assert params["layers"]["moe"]["gate"].sharding == layout.shardings.params["layers"]["moe"]["gate"]
    np.testing.assert_allclose(apply(cfg.model, jax.device_get(params), IDS), ref, atol=1e-4, rtol=0)


def test_maxlm_to_hf_to_maxlm_is_bit_identical(tmp_path: Path) -> None:
    # A MoE maxlm model whose dense ffn_dim (128) differs from its experts' width (48): the export must use 48.
    cfg, params = _saved_maxlm_state(tmp_path, "model.ffn=moe", "model.num_experts=4", "model.moe_ffn_dim=48",
                                     "model.init_std=0.2", "model.attention=xla", "mesh.tensor=1", "mesh.expert=2")
    assert convert_main(["to-hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--max-shard-size", "40000"]) == 0
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_cfg["model_type"], hf_cfg["architectures"], hf_cfg["intermediate_size"]) == (
        "mixtral", ["MixtralForCausalLM"], 48)
    # 3 globals; per layer 4 attention + 2 norms + router + 4 experts x 3.
    assert len(json.loads((tmp_path / "hf" / INDEX_FILE).read_text())["weight_map"]) == 3 + 2 * (7 + 4 * 3)
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = IDS % cfg.model.vocab_size
    np.testing.assert_allclose(hf_logits(hf, ids), apply(cfg.model, params, ids), atol=1e-4, rtol=0)
    assert_imports_bit_identical(tmp_path, cfg.model, params)  # back, in both layouts: every parameter
    # The unscanned checkpoint exports to the same tensors.
    to_hf(str(tmp_path / "back-false"), str(tmp_path / "hf2"))
    first, second = SafetensorsReader(str(tmp_path / "hf")), SafetensorsReader(str(tmp_path / "hf2"))
    assert first.keys() == second.keys()
    for name in first.keys():
        np.testing.assert_array_equal(first.read(name), second.read(name))


def _one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_config_mapping_and_unsupported_features(tmp_path: Path, capsys) -> None:
    hf = {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
          "num_attention_heads": 32, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2,
          "sliding_window": None}
    m = model_config_from_hf(hf)  # absent keys take MixtralConfig's defaults, not LlamaConfig's
    assert (m.n_kv_heads, m.head_dim, m.rope_theta, m.norm_eps, m.tie_embeddings) == (8, 128, 1e6, 1e-5, False)
    assert (m.ffn, m.ffn_dim, m.moe_ffn_dim, m.load_balance_coef, m.router_jitter) == ("moe", 14336, 14336, 0.001, 0.0)
    assert (m.router_scoring, m.shared_experts, m.first_dense_layers, m.moe_layer_interval) == ("softmax", 0, 0, 1)
    # Mixtral-8x7B's published config.json (transformers 4.x layout) is configs/models/mixtral-8x7b.yml's model.
    published = hf | {"num_key_value_heads": 8, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.02,
                      "max_position_embeddings": 32768}
    want = load_config(resolve_config_path("mixtral-8x7b")).model
    assert model_config_from_hf(published) == dataclasses.replace(want, remat="none", head_dim=128)

    # A sliding window is maxlm's model.sliding_window (every layer); what maxlm cannot represent is refused in one
    # line (tests/test_convert_families.py has the window's logits parity).
    assert model_config_from_hf(published | {"sliding_window": 4096}).sliding_window == 4096
    msg = _one_line_error(model_config_from_hf, published | {"hidden_act": "gelu",
                                                             "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    assert "hidden_act='gelu'" in msg and "RoPE scaling 'dynamic'" in msg

    # maxlm -> config.json: the experts' width even when moe_ffn_dim is 0 (= ffn_dim); MoE configs that Mixtral
    # cannot express match no architecture, and the error says what Mixtral would need.
    out = hf_config_from_model(dataclasses.replace(want, moe_ffn_dim=0, ffn_dim=1000), max_position_embeddings=4096,
                               dtype="bfloat16")
    assert (out["model_type"], out["intermediate_size"], out["router_aux_loss_coef"]) == ("mixtral", 1000, 0.02)
    assert transformers.MixtralConfig.from_dict(out).num_local_experts == 8  # transformers accepts every key
    for change, needs in [({"router_scoring": "sigmoid"}, "model.router_scoring='softmax' (here 'sigmoid')"),
                          ({"shared_experts": 1}, "model.shared_experts=0 (here 1)"),
                          ({"first_dense_layers": 1}, "model.first_dense_layers=0 (here 1)"),
                          ({"moe_layer_interval": 2}, "model.moe_layer_interval=1 (here 2)")]:
        msg = _one_line_error(hf_config_from_model, dataclasses.replace(want, **change), max_position_embeddings=1,
                              dtype="float32")
        assert "no Hugging Face architecture matches" in msg and f"mixtral needs {needs}" in msg, msg
    # A dropping (capacity) run still exports: the weights are a Mixtral's, transformers runs them dropless.
    assert hf_config_from_model(dataclasses.replace(want, capacity_factor=1.25), max_position_embeddings=1,
                                dtype="float32")["model_type"] == "mixtral"

    hf_mixtral(tmp_path / "hf", **SHAPES["gqa-untied"])
    assert convert_main(["config", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    assert "ffn: moe" in printed and "num_experts: 4" in printed and "moe_ffn_dim: 48" in printed
