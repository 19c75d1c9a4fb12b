"""LoRA on routed MoE experts (`lora.targets: expert_gate, expert_up, expert_down`): per-expert adapters
A [E, in, r], B [E, r, out] sharded like their expert weight, step 0 is the base, only adapters train, and the
merged model (in memory and through `maxlm lora merge`) computes what the adapted one does."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import tiny_config
from maxlm.cli import main as cli_main
from maxlm.config import ConfigError
from maxlm.model import Decoder, abstract_params
from maxlm.model.lora import merge_adapters
from maxlm.train.builder import build_core, initial_state
from maxlm.train.lora_state import model_params
from maxlm.train.loop import train

MOE = ("model.ffn=moe", "model.num_experts=4", "model.experts_per_token=2", "model.moe_ffn_dim=32",
       "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=1", "mesh.expert=4")
LORA = ("lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.targets=[q, expert_gate, expert_up, expert_down]",
        "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=0.01")
IDS = np.random.RandomState(0).randint(0, 256, size=(2, 16))


def logits(model_cfg, params, lora=None) -> np.ndarray:
    fn = jax.jit(lambda p, x: Decoder(model_cfg, lora=lora).apply({"params": p}, x))
    return np.asarray(fn(jax.device_get(params), jnp.asarray(IDS)))


def test_expert_adapters_start_at_the_base_train_alone_and_merge(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(*MOE, *LORA, "train.steps=2", "checkpoint.every=2", "train.global_batch_size=8",
                      f"run_dir={run}")
    core = build_core(cfg)
    state = initial_state(core)
    moe = jax.device_get(state.params)["layers"]["moe"]
    assert set(moe) == {"gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b"}
    L, E, D, F = cfg.model.n_layers, 4, cfg.model.d_model, 32
    assert moe["gate_lora_a"].shape == (L, E, D, 4) and moe["gate_lora_b"].shape == (L, E, 4, F)
    assert moe["down_lora_a"].shape == (L, E, F, 4) and moe["down_lora_b"].shape == (L, E, 4, D)
    # Sharded like the expert weight: the expert axis on `expert` for A and B alike.
    sh = core.layout.shardings
    assert tuple(sh.frozen.base["layers"]["moe"]["gate"].spec)[1] == "expert"
    assert tuple(sh.params["layers"]["moe"]["gate_lora_a"].spec)[1] == "expert"
    assert tuple(sh.params["layers"]["moe"]["gate_lora_b"].spec)[1] == "expert"
    base = jax.device_get(state.frozen.base)
    np.testing.assert_array_equal(logits(cfg.model, model_params(state), core.model.lora), logits(cfg.model, base))

    # Two steps through `maxlm train`: the base is untouched, every expert adapter moved, merged == unmerged.
    train(cfg, progress=False)
    from maxlm.train.checkpoint import Checkpointer
    from maxlm.train.lora_state import LoraFrozen, load_base

    with Checkpointer(cfg, core.mesh) as ckpt:
        state = ckpt.restore(core.layout, None).state
    state = state.replace(frozen=LoraFrozen(base=load_base(cfg, core.layout, core.mesh, core.rules)))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.frozen.base), base)
    trained = jax.device_get(state.params)["layers"]["moe"]
    assert all(np.abs(trained[f"{w}_lora_b"]).max() > 0 for w in ("gate", "up", "down"))
    full = model_params(jax.device_get(state))
    want = logits(cfg.model, full, core.model.lora)
    assert np.abs(want - logits(cfg.model, base)).max() > 1e-4
    np.testing.assert_allclose(logits(cfg.model, merge_adapters(full, core.model.lora.scale)), want,
                               rtol=1e-5, atol=1e-5)
    # `maxlm lora merge` folds them one layer tensor at a time, to the same function.
    assert cli_main(["lora", "merge", str(run), str(tmp_path / "merged")]) == 0
    with ocp.StandardCheckpointer() as c:
        merged = c.restore(str(tmp_path / "merged" / "0" / "params"), nn.unbox(abstract_params(cfg.model)))
    np.testing.assert_allclose(logits(cfg.model, merged), want, rtol=1e-5, atol=1e-5)
    # PEFT has no module per routed expert of a fused [E, in, out] weight: one line, exit 2.
    assert cli_main(["lora", "export-peft", str(run), str(tmp_path / "peft")]) == 2
    assert "no PEFT module" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (("lora.dropout=0.1",), "lora.dropout=0.1 cannot apply to routed expert adapters"),
    (("lora.targets=[gate]",), "'gate' matches no projection of this model; valid names: q, k, v, o, expert_gate"),
])
def test_expert_target_mistakes_are_one_line(extra, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_core(tiny_config(*MOE, *LORA, *extra))
