"""LoRA in and out of maxlm on a tiny random Hugging Face Llama: a LoRA run trained from the HF directory exports to
PEFT, `peft.PeftModel.from_pretrained` on the HF base gives maxlm's logits, the adapter imports back bit for bit,
merging (maxlm checkpoint or HF directory) keeps the logits, and a mismatched adapter is one line with exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import numpy as np
import pytest

from helpers import tiny_config
from maxlm.cli import main as cli_main
from maxlm.convert.families import model_config_from_hf
from maxlm.train.builder import build_core, initial_state
from maxlm.train.lora_state import model_params
from maxlm.train.loop import train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_convert import SHAPES, hf_llama, hf_logits, maxlm_logits  # noqa: E402
from test_lora import logits  # noqa: E402

IDS = np.random.RandomState(1).randint(0, 96, size=(2, 24))
TARGETS = "lora.targets=[q, v, o, down]"


def _overrides(hf_dir: Path) -> list[str]:
    m = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    return [f"model.{k}={getattr(m, k)}" for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                                   "ffn_dim", "rope_theta", "norm_eps", "tie_embeddings")]


def test_peft_export_import_and_merge_round_trip(tmp_path: Path, capsys) -> None:
    hf_dir = tmp_path / "hf"
    base = hf_llama(hf_dir, **SHAPES["gqa-tied"])
    common = [*_overrides(hf_dir), f"load_parameters_from={hf_dir}", "lora.enabled=true", "lora.rank=4",
              "lora.alpha=8", TARGETS, "lora.rslora=true", "optim.lr=0.05", "optim.warmup_steps=0",
              "data.seq_len=24"]
    run = tmp_path / "run"
    train(tiny_config(*common, "train.steps=3", f"run_dir={run}"), progress=False)

    # The run's adapters (read back from its checkpoint with lora.load_adapter_from) on the HF base.
    cfg = tiny_config(*common, f"lora.load_adapter_from={run}")
    core = build_core(cfg)
    state = initial_state(core)
    ours = logits(cfg.model, model_params(state), IDS, lora=core.model.lora)
    assert np.abs(ours - hf_logits(base, IDS)).max() > 1e-3  # training moved away from the base

    assert cli_main(["lora", "export-peft", str(run), str(tmp_path / "peft")]) == 0
    pc = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert pc["r"] == 4 and pc["use_rslora"] and sorted(pc["target_modules"]) == ["down_proj", "o_proj", "q_proj",
                                                                                  "v_proj"]
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    np.testing.assert_allclose(hf_logits(peft_model, IDS), ours, atol=1e-4, rtol=0)

    # PEFT -> maxlm: the same adapter tensors, bit for bit.
    imported = initial_state(build_core(tiny_config(*common, f"lora.load_adapter_from={tmp_path / 'peft'}")))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(imported.params),
                           jax.device_get(state.params))

    # Merged weights compute the adapted model: as a maxlm checkpoint and as a Hugging Face directory.
    assert cli_main(["lora", "merge", str(run), str(tmp_path / "merged")]) == 0
    np.testing.assert_allclose(maxlm_logits(str(tmp_path / "merged" / "0"), IDS), ours, atol=1e-4, rtol=0)
    assert cli_main(["lora", "merge", str(run), str(tmp_path / "merged_hf"), "--hf"]) == 0
    merged_hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged_hf",
                                                              attn_implementation="eager").float().eval()
    np.testing.assert_allclose(hf_logits(merged_hf, IDS), ours, atol=1e-4, rtol=0)

    # An adapter for another base (tiny's d_model 64, not 32): one line naming both shapes, exit 2.
    capsys.readouterr()
    code = cli_main(["train", "tiny", "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.rslora=true",
                     TARGETS, f"lora.load_adapter_from={tmp_path / 'peft'}", f"run_dir={tmp_path / 'bad'}",
                     "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "has shape (4, 32) but this model and lora.rank need (4, 64)" in err, err
    code = cli_main(["train", "tiny", "lora.enabled=true", "lora.rank=8", TARGETS,
                     f"lora.load_adapter_from={tmp_path / 'peft'}", f"run_dir={tmp_path / 'bad'}", "--no-progress"])
    assert code == 2 and "the adapter has r=4; set lora.rank=4" in capsys.readouterr().err
