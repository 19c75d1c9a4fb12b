"""Reading a config: YAML with `base_config:` inheritance, dotted `key=value` overrides, typing against the schema.

Loading goes YAML chain -> dotted overrides -> type check -> `check_static`; `validate` (which needs only the
device count) runs before anything is built, so every mistake is reported before anything compiles.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

from maxlm.config.checks import check_static
from maxlm.config.schema import Config, ConfigError

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


def config_from_dict(data: dict[str, Any]) -> Config:
    """A Config from its `to_dict()` form (what checkpoint metadata records), checked like a loaded one."""
    cfg = _build(Config, data)
    check_static(cfg)
    return cfg


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=120)
