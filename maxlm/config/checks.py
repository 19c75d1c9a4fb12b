"""Validation of a loaded config: ranges, choices and divisibility (`check_static`, no devices needed) and the
mesh (`validate`, given the device count). Every failure is one ConfigError line naming the key and the fix."""

from __future__ import annotations

import math
import os

from maxlm.config.data_spec import check_data_config
from maxlm.config.model_checks import check_model_options
from maxlm.config.range_checks import check_ranges
from maxlm.config.lora_checks import check_lora
from maxlm.config.generate_checks import check_generate
from maxlm.config.preference_checks import check_preference
from maxlm.config.schema import HEAD_NAMES, FFN_NAMES, MESH_AXES, OBJECTIVE_NAMES, REMAT_NAMES, Config, ConfigError, \
    MeshConfig, ModelConfig


def check_checkpoint(cfg: Config) -> None:
    """`checkpoint.*` ranges and `load_parameters_from` (a local path must exist; its format and shapes are checked
    when the run is built, by maxlm.train.checkpoint)."""
    c = cfg.checkpoint
    for key, val in [("checkpoint.every", c.every), ("checkpoint.keep_last", c.keep_last),
                     ("checkpoint.keep_every", c.keep_every)]:
        if val < 0:
            raise ConfigError(f"{key} must be >= 0, got {val}")
    path = cfg.load_parameters_from
    if path and "://" not in path and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(f"load_parameters_from: {path} does not exist; give a maxlm checkpoint directory (a run's "
                          "checkpoints/ or one step in it) or a Hugging Face model directory (config.json + "
                          "safetensors)")




def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(options)}")


def check_static(cfg: Config) -> None:
    """Checks that need no devices: ranges, choices, divisibility inside the model and batch."""
    m, t, d, o = cfg.model, cfg.train, cfg.data, cfg.optim
    check_checkpoint(cfg)
    check_ranges(cfg)
    check_lora(cfg)
    check_generate(cfg.generate)
    for key, val in [("model.vocab_size", m.vocab_size), ("model.d_model", m.d_model), ("model.n_layers", m.n_layers),
                     ("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads), ("model.ffn_dim", m.ffn_dim),
                     ("data.seq_len", d.seq_len), ("train.global_batch_size", t.global_batch_size),
                     ("train.grad_accum", t.grad_accum), ("train.log_every", t.log_every)]:
        if val <= 0:
            raise ConfigError(f"{key} must be positive, got {val}")
    if t.steps < 0:
        raise ConfigError(f"train.steps must be >= 0, got {t.steps}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; set model.head_dim")
    if m.head_dim_resolved % 2:
        raise ConfigError(f"head_dim={m.head_dim_resolved} must be even for RoPE")
    _choice(m.dtype, ("auto", "float32", "bfloat16", "float16"), "model.dtype")
    _choice(m.param_dtype, ("float32", "bfloat16"), "model.param_dtype")
    _choice(m.attention, ("auto", "xla", "cudnn"), "model.attention")
    _choice(m.remat, REMAT_NAMES, "model.remat")
    _choice(m.head, HEAD_NAMES, "model.head")
    _choice(m.ffn, FFN_NAMES, "model.ffn")
    check_model_options(m)  # RoPE scaling, biases, QK-norm, sliding window
    if m.ffn == "moe":
        _check_moe(m)
    _choice(o.schedule, ("cosine", "wsd", "constant"), "optim.schedule")
    _choice(t.objective, OBJECTIVE_NAMES, "train.objective")
    if t.global_batch_size % t.grad_accum:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by train.grad_accum="
                          f"{t.grad_accum}; pick a batch that is a multiple of it")
    if o.lr <= 0 or o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1 or not 0 < o.decay_fraction <= 1:
        raise ConfigError("optim: need lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1, 0 < decay_fraction <= 1")
    for i, rule in enumerate(cfg.mesh.rules):
        if not (isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(f"mesh.rules[{i}]={rule!r} must be [logical_name, mesh_axis | [mesh_axes] | null]")
        axes = rule[1] if isinstance(rule[1], list) else [rule[1]] if rule[1] is not None else []
        for ax in axes:
            if ax not in MESH_AXES:
                raise ConfigError(f"mesh.rules[{i}]: {ax!r} is not a mesh axis ({', '.join(MESH_AXES)})")
    check_data_config(cfg)
    check_preference(cfg)


def _check_moe(m: ModelConfig) -> None:
    """Ranges of the Mixture-of-Experts keys (only when `model.ffn: moe`)."""
    if m.num_experts < 1:
        raise ConfigError(f"model.num_experts must be >= 1 for model.ffn=moe, got {m.num_experts}")
    if not 1 <= m.experts_per_token <= m.num_experts:
        raise ConfigError(f"model.experts_per_token={m.experts_per_token} must be between 1 and model.num_experts="
                          f"{m.num_experts}")
    for key, val in [("model.moe_ffn_dim", m.moe_ffn_dim), ("model.shared_experts", m.shared_experts),
                     ("model.first_dense_layers", m.first_dense_layers), ("model.router_jitter", m.router_jitter),
                     ("model.load_balance_coef", m.load_balance_coef), ("model.router_z_coef", m.router_z_coef),
                     ("model.router_bias_rate", m.router_bias_rate)]:
        if val < 0:
            raise ConfigError(f"{key} must be >= 0, got {val}")
    if m.moe_layer_interval < 1:
        raise ConfigError(f"model.moe_layer_interval must be >= 1 (1: every layer is MoE), got {m.moe_layer_interval}")
    if m.first_dense_layers + m.moe_layer_interval > m.n_layers:
        raise ConfigError(f"model.first_dense_layers={m.first_dense_layers} and model.moe_layer_interval="
                          f"{m.moe_layer_interval} leave no MoE layer in model.n_layers={m.n_layers}")
    if not m.router_jitter < 1:
        raise ConfigError(f"model.router_jitter must be in [0, 1), got {m.router_jitter}")
    if m.router_scale <= 0:
        raise ConfigError(f"model.router_scale must be positive, got {m.router_scale}")
    _choice(m.router_scoring, ("softmax", "sigmoid"), "model.router_scoring")
    _choice(m.moe_matmul, ("auto", "ragged_dot", "tiled", "blocked"), "model.moe_matmul")



def resolve_mesh_shape(mc: MeshConfig, num_devices: int) -> dict[str, int]:
    """Fills the single -1 ICI axis so that prod(ICI) * prod(DCN) == num_devices."""
    ici = {a: getattr(mc, a) for a in MESH_AXES}
    dcn = {a: getattr(mc, f"dcn_{a}") for a in MESH_AXES}
    for a, v in list(ici.items()) + [(f"dcn_{a}", v) for a, v in dcn.items()]:
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{a}={v} must be a positive size or -1 (auto)")
    if any(v == -1 for v in dcn.values()):
        raise ConfigError("mesh.dcn_* sizes cannot be -1; give every DCN (cross-slice) size explicitly")
    auto = [a for a, v in ici.items() if v == -1]
    if len(auto) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in auto)}")
    slices = math.prod(dcn.values())
    if num_devices % slices:
        raise ConfigError(f"mesh: {num_devices} devices are not divisible into {slices} slices (mesh.dcn_*)")
    per_slice = num_devices // slices
    known = math.prod(v for v in ici.values() if v != -1)
    if auto:
        if per_slice % known:
            raise ConfigError(f"mesh: cannot fill mesh.{auto[0]}=-1: {per_slice} devices per slice are not divisible "
                              f"by the other axes' product {known}")
        ici[auto[0]] = per_slice // known
    if math.prod(ici.values()) != per_slice:
        shape = " x ".join(f"{a}={v}" for a, v in ici.items())
        raise ConfigError(f"mesh: {shape} = {math.prod(ici.values())} devices, but {per_slice} are available "
                          f"per slice; make the product match or set one axis to -1")
    return {a: ici[a] * dcn[a] for a in MESH_AXES} | {f"ici_{a}": ici[a] for a in MESH_AXES} | {
        f"dcn_{a}": dcn[a] for a in MESH_AXES}


def validate(cfg: Config, num_devices: int) -> dict[str, int]:
    """Device-dependent checks; returns the resolved mesh shape. Call before building anything."""
    check_static(cfg)
    shape = resolve_mesh_shape(cfg.mesh, num_devices)
    batch_axes = _rule_axes(cfg.mesh.rules, "act_batch")
    dp = math.prod(shape[a] for a in batch_axes)
    mb = cfg.micro_batch_size
    if mb % dp:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} (/ grad_accum={cfg.train.grad_accum} = {mb} rows "
            f"per microbatch) is not divisible by the data-parallel size {dp} ({' x '.join(batch_axes)}); use a "
            f"multiple of {dp * cfg.train.grad_accum}")
    tp = shape["tensor"]
    m = cfg.model
    for key, val in [("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads), ("model.ffn_dim", m.ffn_dim)]:
        if val % tp:
            raise ConfigError(f"{key}={val} is not divisible by mesh.tensor={tp}; pick a tensor size that divides it")
    fs = shape["fsdp"]
    if m.d_model % fs:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by mesh.fsdp={fs}")
    if m.ffn == "moe":
        _validate_moe_mesh(cfg, shape, batch_axes)
    return shape


def _validate_moe_mesh(cfg: Config, shape: dict[str, int], batch_axes: list[str]) -> None:
    """Expert parallelism: experts split evenly over the mesh axes `exp` maps to, and those axes also split the
    batch (each expert shard must hold different tokens for the all-to-all exchange to be a permutation)."""
    m = cfg.model
    exp_axes = [a for a in _rule_axes(cfg.mesh.rules, "exp") if shape[a] > 1]
    ep = math.prod(shape[a] for a in exp_axes)
    if m.num_experts % ep:
        raise ConfigError(f"model.num_experts={m.num_experts} is not divisible by the expert-parallel size {ep} "
                          f"({' x '.join(exp_axes)}); pick mesh.expert that divides it")
    missing = [a for a in exp_axes if a not in batch_axes]
    if missing:
        raise ConfigError(f"mesh.rules: experts are split over {', '.join(missing)} but act_batch is not; add "
                          f"{missing[0]} to the act_batch rule (expert parallelism exchanges tokens over it)")
    split_mlp = [a for a in _rule_axes(cfg.mesh.rules, "mlp") if shape[a] > 1 and a in batch_axes]
    if split_mlp:
        raise ConfigError(f"mesh.rules: mlp and act_batch both use {split_mlp[0]}; the experts' hidden size and the "
                          f"batch need different mesh axes")
    tp = shape["tensor"]
    width = m.moe_ffn_dim or m.ffn_dim
    if width % tp:
        raise ConfigError(f"model.moe_ffn_dim={width} is not divisible by mesh.tensor={tp}")


def _rule_axes(rules: list, logical: str) -> list[str]:
    for name, axes in rules:
        if name == logical:
            if axes is None:
                return []
            return list(axes) if isinstance(axes, list) else [axes]
    return []
