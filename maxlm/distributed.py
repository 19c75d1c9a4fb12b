"""Joining JAX's multi-controller runtime: one Python process per host, all running the same program.

Call `initialize()` before anything touches a jax backend. Launch scripts in `launch/` set the variables below.
"""

from __future__ import annotations

import os

import jax

_initialized = False


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def wanted() -> bool:
    """Multi-process when asked explicitly, or when a cluster launcher that JAX understands started us."""
    if os.environ.get("MAXLM_COORDINATOR") or os.environ.get("MAXLM_DISTRIBUTED") == "1":
        return True
    return (_int_env("SLURM_NTASKS") or 1) > 1 or (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1


def initialize() -> None:
    """`MAXLM_COORDINATOR=host:port` + `MAXLM_NUM_PROCESSES` + `MAXLM_PROCESS_ID` for explicit setups (e.g.
    several processes on one machine); otherwise JAX's own cluster detection (TPU pods, SLURM, Open MPI, GKE)."""
    global _initialized
    if _initialized or not wanted():
        return
    coord = os.environ.get("MAXLM_COORDINATOR")
    # A dead peer is noticed within the heartbeat timeout (jax's default 100 s; `maxlm launch local` sets 20).
    timeouts = {"heartbeat_timeout_seconds": _int_env("MAXLM_HEARTBEAT_TIMEOUT")}
    timeouts = {k: v for k, v in timeouts.items() if v}
    if coord:
        jax.distributed.initialize(coordinator_address=coord, num_processes=_int_env("MAXLM_NUM_PROCESSES"),
                                   process_id=_int_env("MAXLM_PROCESS_ID"), **timeouts)
    else:
        jax.distributed.initialize(**timeouts)
    _initialized = True
