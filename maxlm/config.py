"""The one config schema: typed dataclasses, YAML with `base_config:` inheritance, `key=value` overrides.

Every key a user can set is a dataclass field below; `configs/base.yml` mirrors these defaults so a reader sees
them in one file. Loading goes YAML chain -> dotted overrides -> type check -> `validate` (which needs only the
device count, so every mistake is reported before anything compiles).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob as globlib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in a config: the CLI prints its one-line message and exits with code 2."""


# The default logical-axis -> mesh-axis table. Parameters use the plain names; activations the `act_` ones, so
# that e.g. the `embed` dimension of a weight can live on `fsdp` while the batch of activations does too.
DEFAULT_RULES: list[list[Any]] = [
    ["act_batch", ["data", "fsdp", "expert"]],
    ["act_length", None],
    ["act_embed", None],
    ["act_heads", "tensor"],
    ["act_kv_heads", "tensor"],
    ["act_mlp", "tensor"],
    ["act_vocab", "tensor"],
    ["act_exp", "expert"],
    ["vocab", "tensor"],
    ["embed", "fsdp"],
    ["mlp", "tensor"],
    ["heads", "tensor"],
    ["kv_heads", "tensor"],
    ["head_dim", None],
    ["exp", "expert"],
    ["layers", None],
    ["norm", None],
]

MESH_AXES = ("data", "fsdp", "tensor", "expert")


@dataclass
class ModelConfig:
    """Decoder shape and numerics. `ffn` names the feed-forward block plugged into every layer."""

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 0  # 0: d_model // n_heads
    ffn_dim: int = 11008
    ffn: str = "mlp"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "auto"  # compute dtype; auto: bfloat16 on accelerators, float32 on CPU
    param_dtype: str = "float32"
    attention: str = "auto"  # auto | xla | cudnn
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots | dots_no_batch
    # ---- Mixture-of-Experts (used when ffn == "moe"; maxlm/model/moe.py) ----
    num_experts: int = 8  # routed experts per MoE layer
    experts_per_token: int = 2  # top-k
    moe_ffn_dim: int = 0  # hidden size of each routed (and shared) expert; 0: ffn_dim
    shared_experts: int = 0  # always-on experts of width moe_ffn_dim (DeepSeekMoE), added to the routed output
    first_dense_layers: int = 0  # the first N layers keep the dense `mlp` block (DeepSeek-V3: 3)
    moe_layer_interval: int = 1  # after those, every Nth layer is MoE (the others dense): 1 = all, 2 = alternate
    router_scoring: str = "softmax"  # softmax (Mixtral) | sigmoid (DeepSeek-V3, with a selection-only bias)
    router_renormalize: bool = True  # divide the top-k weights by their sum (Mixtral, DeepSeek-V3)
    router_scale: float = 1.0  # multiplies the routed experts' weights (DeepSeek-V3 routed_scaling_factor: 2.5)
    router_bias_rate: float = 0.001  # sigmoid: bias step gamma of DeepSeek-V3's auxiliary-loss-free balancing
    router_jitter: float = 0.0  # training only: router input * U(1 - eps, 1 + eps) (Switch Transformer)
    capacity_factor: float = 0.0  # <= 0: dropless (sort + grouped matmul); > 0: slots per expert per sequence
    # dropless grouped matmul: ragged_dot | tiled | blocked | auto (tiled on CPU, blocked on GPU, TPU ragged_dot)
    moe_matmul: str = "auto"
    load_balance_coef: float = 0.01  # Switch/Mixtral E * sum_e f_e P_e, averaged over MoE layers
    router_z_coef: float = 0.0  # ST-MoE router z-loss mean(logsumexp(logits)^2), averaged over MoE layers
    moe_expert_metrics: bool = True  # log every expert's token fraction per layer (else per-layer summaries only)

    def layer_is_moe(self, i: int) -> bool:
        """Whether layer i (0-based) has the MoE block: after `first_dense_layers` dense layers, the last layer of
        every run of `moe_layer_interval` (interval 2: dense, MoE, dense, MoE, ...; a trailing partial run is dense).
        Defined here once so the model, the parameter/FLOP counter and the planner agree on it."""
        if self.ffn != "moe" or i < self.first_dense_layers:
            return False
        return (i - self.first_dense_layers + 1) % self.moe_layer_interval == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.layer_is_moe(i)]

    @property
    def num_moe_layers(self) -> int:
        """len(moe_layers) in closed form (the planner counts parameters of thousands of shapes)."""
        if self.ffn != "moe":
            return 0
        return max(self.n_layers - self.first_dense_layers, 0) // self.moe_layer_interval


@dataclass
class MeshConfig:
    """Device mesh sizes (one may be -1: filled from the device count) and the logical-axis rules."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1
    # Multi-slice (DCN x ICI): sizes of each axis across slices; the ICI sizes above are per slice.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_expert: int = 1
    rules: list = field(default_factory=lambda: [list(r) for r in DEFAULT_RULES])


@dataclass
class DataConfig:
    """Where tokens come from and how they are packed into rows."""

    source: str = "synthetic"  # synthetic | text | jsonl | parquet | arrayrecord (single-source shorthand)
    path: str = ""  # glob (comma-separated globs allowed) for the single source
    text_field: str = "text"  # JSONL field / Parquet column holding the document
    text_split: str = "file"  # text files: file (one document each) | blank_line (blank-line-separated documents)
    # Weighted sources: [{name, path, weight, format, text_field, text_split, stage_weights, max_files}, ...]
    # (validated into maxlm.data.spec.MixtureComponent); replaces source/path when non-empty.
    mixture: list = field(default_factory=list)
    stage_starts: list = field(default_factory=list)  # fractions of train.steps where stages 1, 2, ... begin
    tokenizer: str = ""  # sentencepiece .model path (a cache carries its own copy)
    cache_dir: str = ""  # pre-tokenized cache written by `maxlm data prepare`; when set, training reads it
    seq_len: int = 128
    shuffle_seed: int = 0
    packing: str = "first_fit"  # first_fit | best_fit
    add_bos: bool = True
    add_eos: bool = True
    num_workers: int = 0  # grain multiprocessing prefetch workers (0: in-process)
    max_files: int = 0  # 0: all files matched by `path`
    eval_fraction: float = 0.0  # documents held out for eval, chosen by document hash
    min_doc_chars: int = 0  # cleaning: drop shorter documents
    max_doc_chars: int = 0  # cleaning: drop longer documents (0: no limit)
    max_non_text_ratio: float = 1.0  # cleaning: drop documents with more control/replacement chars (1: off)
    max_bad_fraction: float = 0.1  # unreadable/malformed items above this fraction stop the run
    prepare_workers: int = 0  # processes for `maxlm data prepare` (0: one per CPU core)
    resume: str = "exact"  # exact: refuse to resume onto other processes/workers/sources | reshuffle: new order


@dataclass
class OptimConfig:
    """AdamW with warmup then cosine / WSD / constant, global-norm clipping and a decay mask."""

    lr: float = 3e-4
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Parameter leaf names never decayed (matched against the last path element).
    no_decay: list = field(default_factory=lambda: ["scale", "embedding"])
    clip_norm: float = 1.0  # <= 0: no clipping


@dataclass
class CheckpointConfig:
    """When and where the train state is saved, and how long checkpoints are kept."""

    dir: str = ""  # "": {run_dir}/checkpoints; a local path or any URL orbax/tensorstore accept (gs://...)
    every: int = 1000  # save every N steps and always at the end; 0: only at the end
    keep_last: int = 3  # the newest N checkpoints are kept
    keep_every: int = 0  # a checkpoint whose step is a multiple of this is kept forever (0: none)
    async_save: bool = True  # write in the background while training goes on


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


@dataclass
class TrainConfig:
    """The loop: how long, how big a batch, which objective, what to log."""

    steps: int = 1000
    global_batch_size: int = 8  # rows per optimizer step, across all devices and microbatches
    grad_accum: int = 1
    objective: str = "pretrain"
    z_loss: float = 0.0
    log_every: int = 10
    hardware: str = "auto"  # peak-FLOP table key for MFU; auto: from the device kind
    compile_cache_dir: str = ""  # persistent XLA compilation cache ("" = off): restarts skip recompiling
    max_nonfinite_steps: int = 3  # consecutive NaN/Inf steps (skipped, not applied) before the run stops
    eval_every: int = 0  # evaluate on the held-out split every N steps (0: never)
    eval_steps: int = 10  # batches per evaluation


@dataclass
class Config:
    """The whole resolved configuration of one run."""

    run_dir: str = "runs/default"
    seed: int = 0
    load_parameters_from: str = ""  # initialise params (not optimizer/step) from a maxlm checkpoint or HF directory
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    # ---- derived values: computed here and nowhere else ----
    @property
    def head_dim(self) -> int:
        return self.model.head_dim or self.model.d_model // self.model.n_heads

    @property
    def micro_batch_size(self) -> int:
        return self.train.global_batch_size // self.train.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.seq_len

    def mesh_shape(self, num_devices: int) -> dict[str, int]:
        """ICI x DCN axis sizes with the one -1 filled in; raises ConfigError when they cannot cover the devices."""
        return resolve_mesh_shape(self.mesh, num_devices)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path} (pass a path to a YAML file, e.g. configs/models/tiny.yml)")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml_chain(path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Reads `path`, recursively merging it over its `base_config:` (relative to the file's directory)."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: base_config cycle through {' -> '.join(_seen)}")
    data = _read_yaml(path)
    base = data.pop("base_config", None)
    if base is None:
        return data
    base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(base_path):
        raise ConfigError(f"{path}: base_config {base!r} not found (looked at {os.path.normpath(base_path)})")
    return _deep_merge(load_yaml_chain(base_path, _seen + (path,)), data)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`a.b=value` strings -> nested dict; values parsed as YAML scalars/lists (typed later against the schema)."""
    out: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like key=value (e.g. train.steps=100)")
        key, raw = arg.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks/converts one value against its annotated type, naming the key on failure."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            close = _closest(k, list(fields))
            hint = f"; did you mean {prefix}{close}?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {v!r}")
            kwargs[k] = _build(tp, v, prefix=f"{key}.")
        else:
            kwargs[k] = _coerce(v, tp, key)
    return cls(**kwargs)


def _closest(name: str, options: list[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return m[0] if m else None


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """YAML chain (if any) + overrides -> a typed Config. Validation that needs devices is `validate`."""
    data = load_yaml_chain(path) if path else {}
    data = _deep_merge(data, parse_overrides(overrides or []))
    cfg = _build(Config, data)
    check_static(cfg)
    return cfg


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=120)


# ----------------------------------------------------------------------------------------------------------
# Validation


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(options)}")


def check_static(cfg: Config) -> None:
    """Checks that need no devices: ranges, choices, divisibility inside the model and batch."""
    m, t, d, o = cfg.model, cfg.train, cfg.data, cfg.optim
    check_checkpoint(cfg)
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
    if cfg.head_dim % 2:
        raise ConfigError(f"head_dim={cfg.head_dim} must be even for RoPE")
    _choice(m.dtype, ("auto", "float32", "bfloat16", "float16"), "model.dtype")
    _choice(m.param_dtype, ("float32", "bfloat16"), "model.param_dtype")
    _choice(m.attention, ("auto", "xla", "cudnn"), "model.attention")
    _choice(m.remat, ("none", "full", "dots", "dots_no_batch"), "model.remat")
    from maxlm.model.ffn import FFN_BLOCKS  # the registry of pluggable feed-forward blocks

    _choice(m.ffn, tuple(FFN_BLOCKS), "model.ffn")
    if m.ffn == "moe":
        _check_moe(m)
    _choice(o.schedule, ("cosine", "wsd", "constant"), "optim.schedule")
    from maxlm.train.losses import OBJECTIVES

    _choice(t.objective, tuple(OBJECTIVES), "train.objective")
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
    from maxlm.data.spec import check_data_config  # the data section's checks live beside the mixture schema

    check_data_config(cfg)


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


def expand_globs(pattern: str) -> list[str]:
    """Comma-separated globs -> sorted unique files (directories expand to every file below them).

    An entry starting with `!` excludes the files it matches (fnmatch on the full path, `*` crosses `/`), e.g.
    `lib/**/*.py,!*/site-packages/*`.
    """
    entries = [p.strip() for p in pattern.split(",") if p.strip()]
    files: set[str] = set()
    for pat in (p for p in entries if not p.startswith("!")):
        for hit in globlib.glob(os.path.expanduser(pat), recursive=True):
            if os.path.isdir(hit):
                for root, _, names in os.walk(hit):
                    files.update(os.path.join(root, n) for n in names)
            elif os.path.isfile(hit):
                files.add(hit)
    excludes = [os.path.expanduser(p[1:]) for p in entries if p.startswith("!")]
    return sorted(f for f in files if not any(fnmatch.fnmatch(f, x) for x in excludes))


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


def config_dir() -> str:
    """The repository's `configs/` directory (for resolving preset names like `tiny`)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config_path(name: str) -> str:
    """Accepts a path, or a preset name (`tiny`, `llama3-8b`) looked up in configs/models and configs/."""
    if os.path.isfile(name):
        return name
    for cand in (os.path.join(config_dir(), "models", f"{name}.yml"), os.path.join(config_dir(), f"{name}.yml"),
                 os.path.join(config_dir(), "experiments", f"{name}.yml")):
        if os.path.isfile(cand):
            return cand
    raise ConfigError(f"config file not found: {name} (pass a YAML path or a preset name from configs/models)")
