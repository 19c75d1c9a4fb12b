"""The `data` section as the pipeline sees it: mixture components, stages, and every data check of the config.

`data.mixture` is a list of mappings in YAML (so it round-trips through `maxlm config` and base.yml unchanged); this
module turns it into typed `MixtureComponent`s and is the one place that validates it. `data.source`/`data.path`
remain the single-source shorthand: they become a one-component mixture, so every later stage (cache, sharding,
eval split, statistics) handles one code path.

Part of the config package (imports nothing above it): `check_static` calls it on every config load.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from typing import Any

from maxlm.config.paths import expand_globs
from maxlm.config.schema import Config, ConfigError, DataConfig
from maxlm.config.sft_checks import check_sft

FORMATS = ("text", "jsonl", "parquet", "arrayrecord", "synthetic")
TEXT_SPLITS = ("file", "blank_line")
PACKINGS = ("first_fit", "best_fit", "none")
# A component's format when it is not given: from the extension of its first glob.
EXTENSION_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
                     ".arrayrecord": "arrayrecord", ".array_record": "arrayrecord"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # component names become cache directory names


@dataclass(frozen=True)
class MixtureComponent:
    """One source of a mixture. `weight` is its share of training *tokens* in stage 0; `stage_weights[k]` its
    share in stage k + 1 (empty: the same weight in every stage)."""

    name: str
    format: str
    path: str = ""
    weight: float = 1.0
    text_field: str = "text"
    text_split: str = "file"
    stage_weights: tuple[float, ...] = ()
    max_files: int = 0
    example_format: str = "text"  # text (documents) | prompt_completion | messages | alpaca (SFT rows)
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"

    def weight_at(self, stage: int) -> float:
        """The component's weight in stage `stage` (0 = before the first of data.stage_starts)."""
        if stage == 0 or not self.stage_weights:
            return self.weight
        return self.stage_weights[stage - 1]

    @property
    def needs_files(self) -> bool:
        return self.format != "synthetic"

    def spec(self) -> dict[str, Any]:
        """What decides the cached tokens of this component (not its weights): compared against a cache."""
        return {"name": self.name, "format": self.format, "path": self.path, "text_field": self.text_field,
                "text_split": self.text_split, "max_files": self.max_files, "example_format": self.example_format}


# Keys a mixture entry may have, with the DataConfig field that gives the default (None: no default).
_ENTRY_KEYS = {"name": None, "path": None, "format": None, "weight": None, "text_field": "text_field",
               "text_split": "text_split", "stage_weights": None, "max_files": "max_files",
               "example_format": "example_format", "prompt_field": "prompt_field",
               "completion_field": "completion_field", "messages_field": "messages_field"}


def _infer_format(path: str) -> str:
    first = next((p.strip() for p in path.split(",") if p.strip() and not p.strip().startswith("!")), "")
    for ext, fmt in EXTENSION_FORMATS.items():
        if first.endswith(ext):
            return fmt
    return "text"


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _parse_entry(i: int, entry: Any, data: DataConfig) -> MixtureComponent:
    where = f"data.mixture[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping like {{name: web, path: 'web/*.jsonl', weight: 0.7}}, "
                          f"got {entry!r}")
    for key in entry:
        if key not in _ENTRY_KEYS:
            close = difflib.get_close_matches(str(key), list(_ENTRY_KEYS), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(_ENTRY_KEYS)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: needs a name of letters, digits, '_', '-' or '.' (it names the cache "
                          f"directory), got {name!r}")
    path = entry.get("path", "")
    if not isinstance(path, str):
        raise ConfigError(f"{where}.path: expected a glob string, got {path!r}")
    fmt = entry.get("format") or _infer_format(path)
    if fmt not in FORMATS:
        raise ConfigError(f"{where}.format={fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt != "synthetic" and not path:
        raise ConfigError(f"{where} ({name}): path is empty; set a glob of {fmt} files")
    weight = _number(entry.get("weight", 1.0), f"{where}.weight")
    stages = entry.get("stage_weights", [])
    if not isinstance(stages, list):
        raise ConfigError(f"{where}.stage_weights: expected a list of numbers (one per data.stage_starts entry), "
                          f"got {stages!r}")
    stage_weights = tuple(_number(w, f"{where}.stage_weights[{k}]") for k, w in enumerate(stages))
    text_field = entry.get("text_field", data.text_field)
    text_split = entry.get("text_split", data.text_split)
    max_files = entry.get("max_files", data.max_files)
    if not isinstance(text_field, str) or not text_field:
        raise ConfigError(f"{where}.text_field: expected a field name, got {text_field!r}")
    if text_split not in TEXT_SPLITS:
        raise ConfigError(f"{where}.text_split={text_split!r} is not one of {', '.join(TEXT_SPLITS)}")
    if isinstance(max_files, bool) or not isinstance(max_files, int) or max_files < 0:
        raise ConfigError(f"{where}.max_files: expected an integer >= 0, got {max_files!r}")
    sft = {k: entry.get(k, getattr(data, k)) for k in ("example_format", "prompt_field", "completion_field",
                                                        "messages_field")}
    for k, v in sft.items():
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{where}.{k}: expected a name, got {v!r}")
    return MixtureComponent(name=name, format=fmt, path=path, weight=weight, text_field=text_field,
                            text_split=text_split, stage_weights=stage_weights, max_files=max_files, **sft)


def components(data: DataConfig) -> list[MixtureComponent]:
    """`data.mixture` as typed components, or the single `data.source`/`data.path` as a one-component mixture."""
    if not isinstance(data.mixture, list):
        raise ConfigError(f"data.mixture: expected a list of sources, got {data.mixture!r}")
    if not data.mixture:
        return [MixtureComponent(name=data.source, format=data.source, path=data.path, text_field=data.text_field,
                                 text_split=data.text_split, max_files=data.max_files,
                                 example_format=data.example_format, prompt_field=data.prompt_field,
                                 completion_field=data.completion_field, messages_field=data.messages_field)]
    comps = [_parse_entry(i, e, data) for i, e in enumerate(data.mixture)]
    seen: set[str] = set()
    for c in comps:
        if c.name in seen:
            raise ConfigError(f"data.mixture: the name {c.name!r} is used twice; names must be unique")
        seen.add(c.name)
    return comps


def num_stages(data: DataConfig) -> int:
    return len(data.stage_starts) + 1


def stage_start_steps(data: DataConfig, total_steps: int) -> list[int]:
    """Optimizer step (= batch index) at which each stage begins: [0, round(f1 * steps), ...]."""
    return [0] + [int(round(float(f) * total_steps)) for f in data.stage_starts]


def _check_choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(options)}")


def _check_ranges(d: DataConfig) -> None:
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1) (e.g. 0.01 holds out 1% of "
                          "documents)")
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1]")
    if not 0.0 < d.max_non_text_ratio <= 1.0:
        raise ConfigError(f"data.max_non_text_ratio={d.max_non_text_ratio} must be in (0, 1] (1 = no filter)")
    for key, val in [("data.min_doc_chars", d.min_doc_chars), ("data.max_doc_chars", d.max_doc_chars),
                     ("data.num_workers", d.num_workers), ("data.prepare_workers", d.prepare_workers),
                     ("data.max_files", d.max_files)]:
        if val < 0:
            raise ConfigError(f"{key} must be >= 0, got {val}")
    if d.max_doc_chars and d.max_doc_chars < d.min_doc_chars:
        raise ConfigError(f"data.max_doc_chars={d.max_doc_chars} is below data.min_doc_chars={d.min_doc_chars}")


def _check_stages(d: DataConfig, comps: list[MixtureComponent]) -> None:
    starts = d.stage_starts
    if not isinstance(starts, list):
        raise ConfigError(f"data.stage_starts: expected a list of fractions of train.steps, got {starts!r}")
    fracs = [_number(s, f"data.stage_starts[{k}]") for k, s in enumerate(starts)]
    if any(not 0.0 < f < 1.0 for f in fracs) or any(b <= a for a, b in zip(fracs, fracs[1:])):
        raise ConfigError(f"data.stage_starts={starts} must be increasing fractions of train.steps in (0, 1), "
                          "e.g. [0.9] for an anneal stage over the last 10% of steps")
    if fracs and not d.mixture:
        raise ConfigError("data.stage_starts needs a data.mixture whose entries give stage_weights")
    for c in comps:
        if c.weight < 0 or any(w < 0 for w in c.stage_weights):
            raise ConfigError(f"data.mixture ({c.name}): weights must be >= 0")
        if c.stage_weights and len(c.stage_weights) != len(fracs):
            raise ConfigError(f"data.mixture ({c.name}): stage_weights has {len(c.stage_weights)} entries but "
                              f"data.stage_starts has {len(fracs)}; give one weight per stage after the first")
    for stage in range(len(fracs) + 1):
        if sum(c.weight_at(stage) for c in comps) <= 0:
            what = "weight" if stage == 0 else f"stage_weights[{stage - 1}]"
            raise ConfigError(f"data.mixture: every {what} is 0; at least one source needs a positive weight")


def check_data_config(cfg: Config) -> None:
    """Every check of the `data` section that needs no devices (called by `maxlm.config.check_static`)."""
    d = cfg.data
    _check_choice(d.source, FORMATS, "data.source")
    _check_choice(d.packing, PACKINGS, "data.packing")
    _check_choice(d.text_split, TEXT_SPLITS, "data.text_split")
    _check_choice(d.resume, ("exact", "reshuffle"), "data.resume")
    _check_ranges(d)
    if d.shards < 1 or cfg.train.global_batch_size % d.shards:
        raise ConfigError(f"data.shards={d.shards} must be >= 1 and divide train.global_batch_size="
                          f"{cfg.train.global_batch_size}; pick a divisor such as 1 or the process count")
    if cfg.train.eval_every > 0 and cfg.micro_batch_size % d.shards:
        raise ConfigError(f"data.shards={d.shards} must divide the eval batch (global_batch_size / grad_accum = "
                          f"{cfg.micro_batch_size} rows); pick a smaller data.shards")
    if d.mixture and d.path:
        raise ConfigError("data.path and data.mixture are both set; put every source into data.mixture "
                          "(data.path is the single-source shorthand)")
    comps = components(d)
    _check_stages(d, comps)
    check_sft(cfg, comps)
    file_comps = [c for c in comps if c.needs_files]
    if cfg.train.eval_every > 0 and file_comps and d.eval_fraction <= 0:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every} needs a held-out split: set data.eval_fraction "
                          "(e.g. 0.01)")
    if not file_comps or d.cache_dir:
        return  # a cache holds its own tokenizer, and the raw files need not exist where training runs
    if d.tokenizer and not os.path.exists(d.tokenizer):
        raise ConfigError(f"data.tokenizer: file not found: {d.tokenizer} (a sentencepiece .model file or a Hugging Face "
                          "tokenizer directory)")
    for c in file_comps:
        if not c.path:
            where = "data.path" if not d.mixture else f"data.mixture ({c.name}).path"
            raise ConfigError(f"{where} is empty; set data.path=GLOB for data.source={c.format}")
    if not d.tokenizer:
        raise ConfigError("data.tokenizer is empty; train one with `maxlm tokenizer train` and set data.tokenizer=PATH")
    matched = [c for c in file_comps if expand_globs(c.path)]
    if not matched:
        if not d.mixture:
            raise ConfigError(f"data.path: no files match {d.path!r}; check the path or glob")
        raise ConfigError("data.mixture: no files match any source's path ("
                          + "; ".join(f"{c.name}: {c.path!r}" for c in file_comps) + ")")
