"""File-system helpers of the config: glob expansion for data paths, and preset names -> YAML paths."""

from __future__ import annotations

import fnmatch
import glob as globlib
import os

from maxlm.config.schema import ConfigError


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



def config_dir() -> str:
    """The repository's `configs/` directory (for resolving preset names like `tiny`)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def resolve_config_path(name: str) -> str:
    """Accepts a path, or a preset name (`tiny`, `llama3-8b`) looked up in configs/models and configs/."""
    if os.path.isfile(name):
        return name
    for cand in (os.path.join(config_dir(), "models", f"{name}.yml"), os.path.join(config_dir(), f"{name}.yml"),
                 os.path.join(config_dir(), "experiments", f"{name}.yml")):
        if os.path.isfile(cand):
            return cand
    raise ConfigError(f"config file not found: {name} (pass a YAML path or a preset name from configs/models)")
