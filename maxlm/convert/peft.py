"""maxlm LoRA adapters <-> PEFT's format (`adapter_config.json` + `adapter_model.safetensors`).

PEFT names each adapted torch Linear's pair `base_model.model.{module}.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r] (peft/utils/save_and_load.py drops the adapter name), with forward y = W x + s * B A x. maxlm's adapter of a
weight [in dims..., out dims...] is A [in dims..., r], B [r, out dims...] (maxlm.model.lora), so PEFT's lora_A is
A flattened to [in, r] and transposed, lora_B is B flattened to [r, out] and transposed. Which Hugging Face module a
maxlm weight is comes from the architecture tables (llama.py, mixtral.py): the tensor mapped to `attn.q` is
`model.layers.{i}.self_attn.q_proj.weight`, so its module is `model.layers.{i}.self_attn.q_proj`. The flattening
order of q's (N, H) and o's (N, H) is the one those tables already use for the base weights.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from maxlm.checkpoint_format import read_meta, resolve_step_dir
from maxlm.config import Config, ConfigError, ModelConfig
from maxlm.convert.layout import Leaf, Unit, assemble_params, classify_leaves, unit_name
from maxlm.convert.mapping import Architecture
from maxlm.convert.params_store import ParamsReader, model_config_from_meta
from maxlm.model.heads import SCORE
from maxlm.model.lora import A_SUFFIX, B_SUFFIX, LoraSpec, base_name, split_adapters
from maxlm.model.transformer import abstract_params

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
SCORE_KEY = PREFIX + SCORE + ".weight"  # a reward head saved as modules_to_save (PEFT strips the wrapper)


def is_peft_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def spec_from_pointer(pointer: dict[str, Any]) -> LoraSpec:
    """The adapters' settings recorded in a LoRA checkpoint's meta (maxlm.checkpoint_format.lora_base_pointer)."""
    return LoraSpec(rank=int(pointer["rank"]), alpha=float(pointer["alpha"]), targets=tuple(pointer["targets"]),
                    rslora=bool(pointer["rslora"]))


def adapter_leaves(cfg: ModelConfig, spec: LoraSpec) -> list[Leaf]:
    """The adapter leaves of the adapted model, classified by layer like the parameters (maxlm.convert.layout)."""
    adapters, _ = split_adapters(nn.unbox(abstract_params(cfg, lora=spec)))
    return classify_leaves(cfg, adapters)


def hf_module(arch: Architecture, cfg: ModelConfig, unit: Unit, base_shape: tuple[int, ...]) -> tuple[str, int]:
    """(Hugging Face module name, number of input dims of the maxlm weight) for an adapter unit."""
    layer, local = unit
    base_local = local[:-1] + (base_name(local[-1]),)
    entry = arch.tensor_for(layer, base_local, cfg)
    n_in = getattr(entry.transform, "n_in", None) if entry is not None else None
    if entry is None or n_in is None or "{e}" in entry.hf:
        raise ConfigError(f"no PEFT module for maxlm's {unit_name((layer, base_local))} in {arch.model_type} "
                          "(only dense projections map onto PEFT LoRA modules)")
    (name,) = entry.hf_names(layer, base_shape)
    return name.removesuffix(".weight"), n_in


def to_peft(local: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    """maxlm A [in..., r] -> lora_A.weight [r, in]; B [r, out...] -> lora_B.weight [out, r]."""
    if local[-1].endswith(A_SUFFIX):
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


def from_peft(local: tuple[str, ...], w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(w.T).reshape(shape)


def peft_key(module: str, local: tuple[str, ...]) -> str:
    return f"{PREFIX}{module}.{'lora_A' if local[-1].endswith(A_SUFFIX) else 'lora_B'}.weight"


def _base_shape(leaf: Leaf, all_leaves: dict[tuple[str, ...], Leaf]) -> tuple[int, ...]:
    """The base weight's per-layer shape: A's input dims + B's output dims."""
    stem = leaf.path[:-1] + (base_name(leaf.path[-1]),)
    a = all_leaves[stem[:-1] + (stem[-1] + A_SUFFIX,)].unit_shape
    b = all_leaves[stem[:-1] + (stem[-1] + B_SUFFIX,)].unit_shape
    return tuple(a[:-1]) + tuple(b[1:])


def _units(cfg: ModelConfig, spec: LoraSpec, arch: Architecture
           ) -> list[tuple[Leaf, int, Unit, str, tuple[int, ...]]]:
    """(leaf, index along its stack, unit, PEFT key, maxlm unit shape) of every adapter tensor."""
    leaves = adapter_leaves(cfg, spec)
    by_path = {leaf.path: leaf for leaf in leaves}
    out = []
    for leaf in leaves:
        base_shape = _base_shape(leaf, by_path)
        for j, unit in enumerate(leaf.units()):
            module, _ = hf_module(arch, cfg, unit, base_shape)
            out.append((leaf, j, unit, peft_key(module, leaf.local), leaf.unit_shape))
    return out


def target_modules(keys: list[str], n_layers: int) -> list[str]:
    """PEFT's `target_modules`: the adapted modules' last names (`q_proj`, ...) when each is adapted in every
    layer, else the full module names (PEFT matches a list entry as a name suffix, so both select exactly these)."""
    modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in keys})
    by_last: dict[str, set[str]] = {}
    for m in modules:
        by_last.setdefault(m.rsplit(".", 1)[-1], set()).add(m)
    if all(len(v) == n_layers for v in by_last.values()):
        return sorted(by_last)
    return modules


def export_peft(checkpoint: str, out_dir: str) -> str:
    """A maxlm LoRA checkpoint (run dir, checkpoint dir or step) -> a PEFT adapter directory for the Hugging Face
    export of its base model (`maxlm convert to-hf` of the base, or the HF directory it was trained from)."""
    from maxlm.convert.families import architecture_for
    from safetensors.numpy import save_file

    step_dir, _ = resolve_step_dir(checkpoint)
    meta = read_meta(step_dir)
    if "lora" not in meta:
        raise ConfigError(f"{checkpoint} is not a LoRA run's checkpoint (its meta has no `lora` entry)")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"{out_dir} exists and is not empty; choose a new output directory")
    cfg = model_config_from_meta(meta)
    pointer = meta["lora"]
    spec = spec_from_pointer(pointer)
    reader = ParamsReader(step_dir)
    tensors: dict[str, np.ndarray] = {}
    for leaf, j, unit, key, _ in _units(cfg, spec, architecture_for(cfg)):
        x = reader.read(leaf.path, (j,) if leaf.stacked else ())
        tensors[key] = to_peft(leaf.local, np.asarray(x, np.float32))
    head = cfg.head == "scalar"  # a reward model's head trained beside the adapters: PEFT's modules_to_save
    if head:
        tensors[SCORE_KEY] = np.ascontiguousarray(np.asarray(reader.read((SCORE, "kernel"), ()), np.float32).T)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    dropout = float(((meta.get("config") or {}).get("lora") or {}).get("dropout", 0.0))
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS" if head else "CAUSAL_LM", "r": spec.rank,
              "lora_alpha": spec.alpha, "lora_dropout": dropout, "use_rslora": spec.rslora, "bias": "none",
              "fan_in_fan_out": False, "target_modules": target_modules([k for k in tensors if k != SCORE_KEY],
                                                                        cfg.n_layers),
              "modules_to_save": [SCORE] if head else None, "init_lora_weights": True, "inference_mode": True,
              "base_model_name_or_path": pointer.get("base")}
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


class PeftUnitSource:
    """Adapter units read from a PEFT directory (for `assemble_params`)."""

    def __init__(self, path: str, units: list[tuple[Leaf, int, Unit, str, tuple[int, ...]]]) -> None:
        from safetensors import safe_open

        self.path = path
        self.keys = {unit: key for _, _, unit, key, _ in units}
        self.file = safe_open(os.path.join(path, ADAPTER_WEIGHTS), framework="numpy")
        self.available = set(self.file.keys())

    def check_unit(self, unit: Unit, shape: tuple[int, ...]) -> None:
        key = self.keys[unit]
        if key not in self.available:
            raise ConfigError(f"the adapter has no {key} (maxlm's {unit_name(unit)}); set lora.targets "
                              "to the modules it adapts (its adapter_config.json target_modules)")
        have = tuple(self.file.get_slice(key).get_shape())
        want = to_peft(unit[1], np.zeros(shape, np.float32)).shape
        if have != want:
            raise ConfigError(f"{key} has shape {have} but this model and lora.rank need "
                              f"{want} (is it an adapter for this base model?)")

    def read_unit(self, unit: Unit, shape: tuple[int, ...]) -> np.ndarray:
        return from_peft(unit[1], self.file.get_tensor(self.keys[unit]), shape)


def load_peft_adapters(path: str, cfg: Config, abstract: Any) -> Any:
    """The adapters of a PEFT directory onto `abstract` (ShapeDtypeStructs with shardings of the run's adapters).
    r, alpha and rsLoRA must equal the run's `lora.*`; every tensor's shape is checked before any is read."""
    from maxlm.convert.families import architecture_for

    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        pc = json.load(f)
    lo = cfg.lora
    for key, theirs, ours, name in [("r", pc.get("r"), lo.rank, "lora.rank"),
                                    ("lora_alpha", pc.get("lora_alpha"), lo.alpha, "lora.alpha"),
                                    ("use_rslora", bool(pc.get("use_rslora", False)), lo.rslora, "lora.rslora")]:
        if theirs is None or (float(theirs) if key != "use_rslora" else theirs) != ours:
            raise ConfigError(f"lora.load_adapter_from={path}: the adapter has {key}={theirs!r}; set {name}={theirs}")
    if pc.get("peft_type", "LORA") != "LORA" or pc.get("bias", "none") != "none":
        raise ConfigError(f"lora.load_adapter_from={path}: only plain LoRA adapters without biases load into maxlm "
                          f"(peft_type={pc.get('peft_type')!r}, bias={pc.get('bias')!r})")
    spec = LoraSpec(rank=lo.rank, alpha=float(lo.alpha), targets=tuple(lo.targets), rslora=lo.rslora)
    units = _units(cfg.model, spec, architecture_for(cfg.model))
    source = PeftUnitSource(path, units)
    for _, _, unit, _, shape in units:  # shapes first: an adapter for another base says so
        try:
            source.check_unit(unit, shape)
        except ConfigError as e:
            raise ConfigError(f"lora.load_adapter_from={path}: {e}") from None
    head = cfg.model.head == "scalar"
    if head and SCORE_KEY not in source.available:
        raise ConfigError(f"lora.load_adapter_from={path} has no {SCORE_KEY}: a reward model's adapter carries its "
                          "head (PEFT modules_to_save=['score']); use an adapter trained as a sequence classifier")
    extra = sorted(source.available - set(source.keys.values()) - ({SCORE_KEY} if head else set()))
    if extra:
        raise ConfigError(f"lora.load_adapter_from={path} adapts {len(extra)} tensor(s) this run's lora.targets do not, "
                          f"e.g. {extra[0]}; set lora.targets to the adapter's target_modules")
    leaves = list({leaf.path: leaf for leaf, *_ in units}.values())
    body = {k: v for k, v in abstract.items() if k != SCORE}
    adapters = assemble_params(source, cfg.model, body, f"lora.load_adapter_from={path}", leaves=leaves)
    if head:
        target = abstract[SCORE]["kernel"]
        kernel = source.file.get_tensor(SCORE_KEY).T
        if kernel.shape != target.shape:
            raise ConfigError(f"lora.load_adapter_from={path}: {SCORE_KEY} has shape {kernel.shape[::-1]}, this model "
                              f"needs {target.shape[::-1]}")
        adapters[SCORE] = {"kernel": jax.device_put(kernel.astype(target.dtype), target.sharding)}
    return adapters

