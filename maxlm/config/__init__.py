"""The one config schema and everything that reads and checks it.

    schema.py     dataclasses of every key (imports nothing from maxlm), names of pluggable choices
    data_spec.py  the `data` section as typed mixture components, and its checks
    checks.py     check_static (no devices) and validate (given the device count)
    load.py       YAML chain + overrides -> typed Config
    paths.py      glob expansion, preset names -> YAML files

The package imports no jax: `maxlm config` and `maxlm plan` start in a fraction of a second.
"""

from maxlm.config.checks import check_static, resolve_mesh_shape, validate
from maxlm.config.data_spec import MixtureComponent, check_data_config, components
from maxlm.config.load import config_from_dict, config_to_yaml, load_config, load_yaml_chain, parse_overrides
from maxlm.config.paths import config_dir, expand_globs, resolve_config_path
from maxlm.config.schema import DEFAULT_RULES, FFN_NAMES, LORA_TARGET_NAMES, MESH_AXES, OBJECTIVE_NAMES, REMAT_NAMES, \
    CheckpointConfig, Config, ConfigError, DataConfig, DpoConfig, GenerateConfig, LoraConfig, MeshConfig, ModelConfig, OptimConfig, RewardConfig, TrainConfig

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DEFAULT_RULES", "DataConfig", "DpoConfig", "FFN_NAMES", "GenerateConfig", "LORA_TARGET_NAMES", "LoraConfig", "MESH_AXES", "RewardConfig",
           "MeshConfig", "MixtureComponent", "ModelConfig", "OBJECTIVE_NAMES", "OptimConfig", "REMAT_NAMES",
           "TrainConfig", "check_data_config", "check_static", "components", "config_dir", "config_from_dict", "config_to_yaml",
           "expand_globs", "load_config", "load_yaml_chain", "parse_overrides", "resolve_config_path",
           "resolve_mesh_shape", "validate"]
