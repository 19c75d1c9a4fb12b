"""The config schema: YAML inheritance, typed overrides, validation messages, shipped YAMLs."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest
import yaml

from maxlm.config import Config, ConfigError, config_dir, load_config, load_yaml_chain, resolve_config_path, validate

ALL_YAMLS = sorted(glob.glob(os.path.join(config_dir(), "**", "*.yml"), recursive=True))


def test_base_yml_equals_schema_defaults() -> None:
    with open(os.path.join(config_dir(), "base.yml")) as f:
        data = yaml.safe_load(f)
    assert load_config(os.path.join(config_dir(), "base.yml")).to_dict() == Config().to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(Config)}  # every section is spelled out


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: os.path.relpath(p, config_dir()))
def test_every_shipped_yaml_loads_and_validates(path: str) -> None:
    # experiments name data that is filled in at run time: check them on synthetic documents (SFT keys still parse)
    experiment = ["data.source=synthetic", "data.example_format=text", "train.objective=pretrain"]
    cfg = load_config(path, experiment if "experiments" in path else [])
    devices = 8 if cfg.mesh.tensor <= 8 else cfg.mesh.tensor
    validate(cfg, devices if cfg.train.global_batch_size % devices == 0 else 1)


def test_inheritance_and_typed_overrides(tmp_path) -> None:
    exp = tmp_path / "exp.yml"
    exp.write_text(f"base_config: {resolve_config_path('tiny')}\ntrain:\n  steps: 7\n")
    cfg = load_config(str(exp), ["optim.lr=1e-4", "model.tie_embeddings=true", "mesh.rules=[[act_batch, data]]"])
    assert cfg.train.steps == 7 and cfg.model.d_model == 64  # own value, inherited value
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.tie_embeddings is True
    assert cfg.mesh.rules == [["act_batch", "data"]]
    assert "base_config" not in load_yaml_chain(str(exp))


@pytest.mark.parametrize("overrides, devices, message", [
    (["train.stepz=3"], 8, "unknown config key 'train.stepz'; did you mean train.steps?"),
    (["model.d_modle=3"], 8, "did you mean model.d_model?"),
    (["train.steps=abc"], 8, "train.steps: expected an integer, got 'abc'"),
    (["model.tie_embeddings=3"], 8, "model.tie_embeddings: expected true/false"),
    (["mesh.data=3", "mesh.fsdp=1", "mesh.tensor=2"], 8, "mesh: data=3 x fsdp=1 x tensor=2 x expert=1 = 6 devices, but 8"),
    (["mesh.data=-1", "mesh.fsdp=-1"], 8, "only one axis may be -1"),
    (["train.global_batch_size=6"], 8, "train.global_batch_size=6 (/ grad_accum=1 = 6 rows per microbatch) is not "
                                       "divisible by the data-parallel size 4"),
    (["train.global_batch_size=16", "train.grad_accum=3"], 8, "not divisible by train.grad_accum=3"),
    (["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8"], 8, "model.n_heads=4 is not divisible by mesh.tensor=8"),
    (["model.n_kv_heads=3"], 8, "model.n_heads=4 must be a multiple of model.n_kv_heads=3"),
    (["model.remat=some"], 8, "model.remat='some' is not one of none, full, dots, dots_no_batch"),
    (["data.source=text", "data.path=/nonexistent/*.txt", "data.tokenizer="], 8, "data.tokenizer is empty"),
])
def test_config_errors_name_the_key(overrides: list[str], devices: int, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(load_config(resolve_config_path("tiny"), overrides), devices)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_data_path_and_tokenizer(tmp_path) -> None:
    tok = tmp_path / "t.model"
    tok.write_bytes(b"x")
    with pytest.raises(ConfigError, match="data.path: no files match"):
        load_config(resolve_config_path("tiny"), ["data.source=text", f"data.tokenizer={tok}",
                                                  f"data.path={tmp_path}/none/*.py"])
    with pytest.raises(ConfigError, match="data.tokenizer: file not found"):
        load_config(resolve_config_path("tiny"), ["data.source=text", f"data.tokenizer={tmp_path}/missing.model",
                                                  f"data.path={tmp_path}"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yml"))


def test_mesh_auto_fill() -> None:
    cfg = load_config(resolve_config_path("tiny"), ["mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=2"])
    shape = validate(cfg, 8)
    assert (shape["data"], shape["fsdp"], shape["tensor"], shape["expert"]) == (2, 2, 2, 1)
    multi = load_config(resolve_config_path("tiny"), ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=2",
                                                      "mesh.dcn_data=2"])
    shape = validate(multi, 8)
    assert (shape["data"], shape["fsdp"], shape["tensor"], shape["ici_fsdp"]) == (2, 2, 2, 2)


def test_cudnn_attention_without_a_gpu_fails_before_compiling() -> None:
    from maxlm.train.builder import build_run

    with pytest.raises(ConfigError, match="model.attention=cudnn needs an NVIDIA GPU"):
        build_run(load_config(resolve_config_path("tiny"), ["model.attention=cudnn"]))
