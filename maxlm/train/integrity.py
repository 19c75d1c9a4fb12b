"""What makes a saved step trustworthy: checksums of its arrays, finiteness, and the shape of its JSON pieces.

Array checksums are computed on the device arrays themselves (not on files), so they hold whatever the on-disk
format, compression or storage is, and they survive restoring onto another mesh or process count. Each leaf x
with n elements gets

    C(x) = sum_i  w(i) * u(x_i)   mod 2^32,

where u(x_i) is the element's bit pattern widened to uint32 and w(i) an odd 32-bit hash of its flat index i
(a multiply-xorshift mix in the style of MurmurHash3's finaliser). Integer addition mod 2^32 is associative, so
the sum is the same however the array is sharded and however XLA orders the reduction; and because every weight
is odd, flipping any single bit of any element changes C (w * 2^b != 0 mod 2^32 for b < 32), while the index
weights make swapped or shifted elements change it too. Several flips cancel only with probability ~2^-32.
Computing it is one elementwise pass plus a reduction per leaf inside one jitted call, no gather to a host.

The JSON items (`train`, `meta`) carry a CRC-32 of their own canonical text under `SEAL_KEY`, and are checked for
the fields and types a restore reads, so a step whose JSON parses but has the wrong shape (`{}`, `[1, 2]`, a
flipped digit) is treated like any unreadable step rather than crashing the resume.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import jax
import jax.numpy as jnp

CHECKSUM_KIND = "maxlm-u32-index-weighted-sum-v1"
SEAL_KEY = "json_crc32"


class DamagedStep(Exception):
    """A saved step that must not be resumed from (unreadable, malformed, checksum mismatch or non-finite); the
    checkpointer moves it aside and falls back to an older one."""


def _path(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _mix(i: jax.Array) -> jax.Array:
    """An odd 32-bit hash of uint32 indices (Murmur3 fmix32 constants; the low bit forced to 1)."""
    i = i * jnp.uint32(0x9E3779B1)
    i = i ^ (i >> 16)
    i = i * jnp.uint32(0x85EBCA6B)
    i = i ^ (i >> 13)
    return i | jnp.uint32(1)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    else:
        bits = jnp.dtype(x.dtype).itemsize * 8
        u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):  # the row-major flat index, wrapping mod 2^32 for huge leaves
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
        stride *= x.shape[d]
    return jnp.sum(u * _mix(index), dtype=jnp.uint32)


def _leaf_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


@jax.jit
def _fingerprint(trees: dict[str, Any]) -> tuple[Any, Any]:
    return jax.tree_util.tree_map(_leaf_checksum, trees), jax.tree_util.tree_map(_leaf_finite, trees)


def fingerprint(**trees: Any) -> tuple[dict[str, dict[str, int]], list[str]]:
    """({tree name: {leaf path: checksum}}, [paths of leaves holding NaN/Inf]) for named trees of arrays."""
    sums, finite = jax.device_get(_fingerprint(trees))
    out: dict[str, dict[str, int]] = {}
    for name, tree in sums.items():
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        out[name] = {_path(p): int(v) for p, v in flat}
    bad = [f"{name} {_path(p)!r}" for name, tree in finite.items()
           for p, v in jax.tree_util.tree_flatten_with_path(tree)[0] if not bool(v)]
    return out, bad


def verify(saved: dict[str, dict[str, int]] | None, **trees: Any) -> None:
    """Raises DamagedStep when a restored tree's checksums differ from the saved ones (None: the step predates
    checksums; only finiteness is checked) or when it holds NaN/Inf."""
    got, nonfinite = fingerprint(**trees)
    if saved is not None:
        for name, sums in got.items():
            want = saved.get(name)
            if not isinstance(want, dict) or set(want) != set(sums):
                raise DamagedStep(f"the saved checksums do not list the leaves of {name}")
            bad = [k for k in sums if sums[k] != want[k]]
            if bad:
                raise DamagedStep(f"checksum mismatch in {name} {bad[0]!r}" + (f" and {len(bad) - 1} more leaves"
                                                                              if len(bad) > 1 else ""))
    if nonfinite:
        raise DamagedStep(f"non-finite values (NaN/Inf) in {nonfinite[0]}")


# ----------------------------------------------------------------------------------------------------------
# JSON items


def _canonical(d: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in d.items() if k != SEAL_KEY}, sort_keys=True, separators=(",", ":")).encode()


def seal(d: dict[str, Any]) -> dict[str, Any]:
    """`d` plus a CRC-32 of its canonical JSON (checked by `check_seal`)."""
    return {k: v for k, v in d.items() if k != SEAL_KEY} | {SEAL_KEY: zlib.crc32(_canonical(d))}


def check_seal(d: Any, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DamagedStep(f"{what} is {type(d).__name__} JSON, not an object")
    if SEAL_KEY in d and d[SEAL_KEY] != zlib.crc32(_canonical(d)):
        raise DamagedStep(f"{what} does not match its checksum (edited or damaged)")
    return d


def _shape_table(table: Any, what: str) -> None:
    if not isinstance(table, dict):
        raise DamagedStep(f"meta {what} is not a table of leaf shapes")
    for key, entry in table.items():
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                and all(isinstance(n, int) and n >= 0 for n in entry[0]) and isinstance(entry[1], str)):
            raise DamagedStep(f"meta {what} entry {key!r} is not [shape, dtype]")


def check_meta(meta: Any) -> dict[str, Any]:
    """The fields of `meta` a restore reads, with their types; raises DamagedStep otherwise."""
    meta = check_seal(meta, "meta")
    _shape_table(meta.get("params"), "params")
    if meta.get("opt_state") is not None:
        _shape_table(meta["opt_state"], "opt_state")
    if not isinstance(meta.get("process_count", 1), int) or meta.get("process_count", 1) < 1:
        raise DamagedStep("meta process_count is not a positive integer")
    if not isinstance(meta.get("config") or {}, dict):
        raise DamagedStep("meta config is not an object")
    return meta


def check_train(train: Any) -> dict[str, Any]:
    """The `train` item's fields (step, PRNG key data, non-finite counters, checksums) with their types."""
    train = check_seal(train, "the train item")
    for key in ("step", "nonfinite_run", "nonfinite_total"):
        if not isinstance(train.get(key), int) or train[key] < 0:
            raise DamagedStep(f"the train item's {key!r} is not a non-negative integer")
    rng = train.get("rng")
    if not (isinstance(rng, list) and rng and all(isinstance(v, int) and 0 <= v < 2**32 for v in _flat_ints(rng))):
        raise DamagedStep("the train item's PRNG key data is malformed")
    sums = train.get("checksums")
    if sums is not None and not (isinstance(sums, dict) and all(
            isinstance(t, dict) and all(isinstance(v, int) for v in t.values()) for t in sums.values())):
        raise DamagedStep("the train item's checksums are malformed")
    return train


def _flat_ints(v: Any) -> list[Any]:
    return [x for item in v for x in _flat_ints(item)] if isinstance(v, list) else [v]
