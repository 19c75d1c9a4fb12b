"""The Hugging Face families people fine-tune, built tiny and random here (no download), one case each:

Llama 3.x (RoPE `llama3`), Qwen2.5 (q/k/v biases, YaRN), Qwen3 (QK-norm, linear RoPE), Qwen3-MoE (QK-norm, a dense
first layer, narrow experts, top-k without renormalisation) and Mistral (sliding window); Mixtral has its own
module (tests/test_convert_mixtral.py) and shares this attention code.
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
from maxlm.convert.families import model_config_from_hf, model_fields_from_hf, resolve_model_from_hf
from maxlm.convert.params_store import model_config_from_meta
from maxlm.mesh import build_mesh, logical_rules
from maxlm.model import Decoder, abstract_params
from maxlm.checkpoint_format import read_meta
from maxlm.train.checkpoint import load_parameters
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
            router = pname.endswith("mlp.gate.weight")
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


# ---- presets: published config.json (Hugging Face hub, the keys that shape the model) -> maxlm, counts ----

_LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
PUBLISHED = {  # preset: (config.json, parameter count on the model card / from transformers)
    "llama3.1-8b": ({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": _LLAMA31_ROPE,
                     "max_position_embeddings": 131072, "tie_word_embeddings": False}, 8_030_261_248),
    "llama3.2-1b": ({"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": _LLAMA31_ROPE | {"factor": 32.0},
                     "max_position_embeddings": 131072, "tie_word_embeddings": True}, 1_235_814_400),
    "qwen2.5-7b": ({"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
                    "rope_theta": 1000000.0, "max_position_embeddings": 131072, "sliding_window": 131072,
                    "use_sliding_window": False, "max_window_layers": 28, "tie_word_embeddings": False},
                   7_615_616_512),
    "qwen3-8b": ({"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                  "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                  "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None, "max_position_embeddings": 40960,
                  "sliding_window": None, "use_sliding_window": False, "max_window_layers": 36,
                  "attention_bias": False, "tie_word_embeddings": False}, 8_190_735_360),
    "qwen3-30b-a3b": ({"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                       "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                       "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                       "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                       "router_aux_loss_coef": 0.001, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                       "max_position_embeddings": 40960, "sliding_window": None, "use_sliding_window": False,
                       "max_window_layers": 48, "attention_bias": False, "tie_word_embeddings": False},
                      30_532_122_624),
    "mistral-7b": ({"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
                    "rope_theta": 10000.0, "sliding_window": 4096, "max_position_embeddings": 32768,
                    "tie_word_embeddings": False}, 7_241_732_096),
}


def _meta_count(config_json: dict) -> int:
    """transformers' parameter count of a config, on torch's meta device (nothing allocated)."""
    cfg = transformers.AutoConfig.for_model(**config_json)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_matches_published_config_and_counts(preset: str, capsys) -> None:
    from maxlm.cli import main as maxlm_main
    from maxlm.convert.hf import hf_config_from_model
    from maxlm.flops import HARDWARE, count_params
    from maxlm.model import count_params_eval_shape
    from maxlm.plan.memory import choose_mesh
    from maxlm.plan.shape import MoESpec

    published, count = PUBLISHED[preset]
    cfg = load_config(resolve_config_path(preset))
    m = cfg.model
    _, fields = model_fields_from_hf(published, preset)
    effective = {k: getattr(m, k) for k in fields} | {"head_dim": m.head_dim or m.d_model // m.n_heads}
    assert effective == fields  # the preset is what `model.from_hf` would build from the published config.json
    export = hf_config_from_model(m, max_position_embeddings=cfg.data.seq_len, dtype="bfloat16")
    assert count_params(m).total == count_params_eval_shape(m) == _meta_count(published) == _meta_count(export) == count
    assert maxlm_main(["inspect", preset, "--devices", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == count
    moe = MoESpec(m.num_experts, m.experts_per_token) if m.ffn == "moe" else None
    choice = choose_mesh(m, moe, count_params(m), cfg.data.seq_len, global_rows=cfg.train.global_batch_size,
                         chips=64, hbm_bytes=HARDWARE["h100"].hbm_bytes)
    assert choice.fits and choice.estimate.total <= choice.usable_bytes


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
     "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1, "truncate": False},
    {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
], ids=["llama3.1", "qwen2.5-yarn", "deepseek-yarn-mscale", "linear"])
def test_rope_frequencies_equal_transformers(rope: dict) -> None:
    """Full-size head_dim 128 frequencies and attention factor against transformers' own init functions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from maxlm.model.rope import rope_frequencies

    hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 4096, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 32, "max_position_embeddings": 131072, "rope_parameters": rope}
    inv_freq, factor = rope_frequencies(model_config_from_hf(hf))
    want, want_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](transformers.LlamaConfig(**hf), "cpu")
    # maxlm evaluates the same formulas in float64 and rounds once; transformers rounds every float32 step. That
    # moves llama3's smoothed frequencies by ~3e-7 relative, and YaRN's ramp (an un-truncated, fractional one,
    # mixing frequencies 40x apart) by up to 2.4e-6; all other frequencies agree to float32 rounding.
    np.testing.assert_allclose(inv_freq, want.numpy(), rtol=3e-6, atol=0)
    assert factor == pytest.approx(want_factor, rel=1e-12)


def test_option_keys_are_validated_and_window_mask_follows_documents(tmp_path: Path, capsys) -> None:
    from maxlm.cli import main as maxlm_main
    from maxlm.model.attention import attention_mask

    for overrides, phrase in [
        (["model.rope_factor=4"], "model.rope_factor=4.0 is ignored by model.rope_scaling=none"),
        (["model.rope_scaling=llama3", "model.rope_factor=8"], "needs model.rope_original_max_positions"),
        (["model.rope_scaling=yarn", "model.rope_factor=4", "model.rope_original_max_positions=16",
          "model.rope_beta_slow=40"], "need 0 < beta_slow < beta_fast"),
        (["model.rope_scaling=ntk"], "model.rope_scaling='ntk' is not one of none, linear, llama3, yarn"),
        (["model.sliding_window=-1"], "model.sliding_window must be >= 0"),
        ([f"model.from_hf={tmp_path}"], "no config.json there"),
    ]:
        assert maxlm_main(["config", "tiny", *overrides]) == 2
        err = capsys.readouterr().err
        assert phrase in err and err.count("\n") == 1, err
    # Two packed documents (positions restart): a window of 2 sees itself and one token back, never across.
    seg = np.array([[1, 1, 1, 2, 2, 2]])
    pos = np.array([[0, 1, 2, 0, 1, 2]])
    mask = np.asarray(attention_mask(seg, seg, pos, pos, 2))[0, 0] & np.tril(np.ones((6, 6), bool))
    assert [list(np.nonzero(row)[0]) for row in mask] == [[0], [0, 1], [1, 2], [3], [3, 4], [4, 5]]


def test_from_hf_key_keeps_maxlm_config_light(tmp_path: Path) -> None:
    """`maxlm config ... model.from_hf=DIR` reads config.json without loading jax (like every `maxlm config`)."""
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED["qwen3-30b-a3b"][0]))
    code = ("import sys; from maxlm.cli import main; rc = main(['config', 'tiny', 'model.from_hf=%s']); "
            "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'torch'))); "
            "sys.exit(rc)") % tmp_path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout and "num_experts: 128" in out.stdout, out.stdout[-500:]
