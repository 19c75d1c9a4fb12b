"""File-system helpers of the config: glob expansion for data paths, preset names -> YAML paths, and output
paths checked before any work starts (so a wrong one is one line naming the key, not a traceback later)."""

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


def _existing_ancestor(path: str) -> str:
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def check_dir_path(path: str, key: str) -> str:
    """`path` absolute; ConfigError naming `key` when it is an existing file or lies under one. Creates nothing."""
    if "://" in path:
        return path
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}={path} is an existing file, not a directory; remove it or choose another {key}")
    ancestor = _existing_ancestor(path)
    if ancestor and not os.path.isdir(ancestor):
        raise ConfigError(f"{key}={path}: {ancestor} is a file, not a directory; choose a {key} outside it")
    return path


def writable_dir(path: str, key: str) -> str:
    """Creates directory `path` (if needed) and returns it absolute; ConfigError naming `key` when it is a file, is
    under a file, or cannot be created or written. URLs (gs://...) are returned unchecked."""
    if "://" in path:
        return path
    path = check_dir_path(path, key)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}={path} cannot be created ({e.strerror}); choose a writable {key}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} is not writable; fix its permissions or choose a writable {key}")
    return path


def writable_file(path: str, key: str) -> str:
    """`path` absolute, its directory created; ConfigError naming `key` when it is a directory or its directory
    cannot be made."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise ConfigError(f"{key}={path} is a directory; give a file path")
    ancestor = _existing_ancestor(os.path.dirname(path))
    if ancestor and not os.path.isdir(ancestor):
        raise ConfigError(f"{key}={path}: {ancestor} is a file, not a directory; choose a {key} outside it")
    writable_dir(os.path.dirname(path), key)
    return path
