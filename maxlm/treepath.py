"""One spelling of a parameter's name: a jax key path as a tuple of strings, or joined (`layers/attn/q`).

Checkpoint metadata, conversion tables, `maxlm inspect`, sharding errors, the optimizer's decay mask and adapters
all name parameters; they all go through here so the same leaf has the same name everywhere.
"""

from __future__ import annotations

from typing import Any


def key_name(key: Any) -> str:
    """One element of a jax key path as text: dict keys, attribute names (optax namedtuples) and indices."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_parts(key_path: Any) -> tuple[str, ...]:
    """A jax key path as a tuple of names: ('layers', 'attn', 'q')."""
    return tuple(key_name(k) for k in key_path)


def path_name(key_path: Any, sep: str = "/") -> str:
    """A jax key path as one string: 'layers/attn/q' (or with another separator)."""
    return sep.join(path_parts(key_path))
