"""Joining JAX's multi-controller runtime: one Python process per host, all running the same program.

Call `initialize()` before anything touches a jax backend. Launch scripts in `launch/` set the variables below.

When one process of a run dies (OOM kill, a lost host), the others would block in their next collective until
JAX's coordination service gives up on the missing heartbeats (100 s) and aborts them with a C++ check failure
(exit 134, hundreds of lines). `PeerWatchdog` ends them sooner and in one line: every process bumps a counter in
the coordination service's key-value store every PEER_POLL_S seconds and watches the others'; a peer whose counter
stops for `MAXLM_PEER_TIMEOUT` seconds (default PEER_TIMEOUT_S, or half of MAXLM_HEARTBEAT_TIMEOUT when that is
shorter), or a coordinator that stops answering, ends this
process with "maxlm: error: ..." and exit code 1. A checkpoint a dead peer took part in is complete or absent, so
rerunning the same command resumes.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax

PEER_POLL_S = 2.0
PEER_TIMEOUT_S = 30.0

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
    global _initialized, _watchdog
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
    if jax.process_count() > 1:
        # Below JAX's own heartbeat timeout, so that the one-line verdict comes before its abort.
        default = min(PEER_TIMEOUT_S, 0.5 * (_int_env("MAXLM_HEARTBEAT_TIMEOUT") or 100))
        _watchdog = PeerWatchdog(float(os.environ.get("MAXLM_PEER_TIMEOUT") or default))
        _watchdog.start()


class PeerWatchdog(threading.Thread):
    """Ends this process with one line when another process of the run stops (see the module docstring)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(name="maxlm-peer-watchdog", daemon=True)
        self.timeout_s = timeout_s
        self.stopped = threading.Event()

    def run(self) -> None:
        from jax._src import distributed as jax_distributed

        client = jax_distributed.global_state.client
        me, n = jax.process_index(), jax.process_count()
        started = time.monotonic()
        seen: dict[int, tuple[str | None, float]] = {j: (None, started) for j in range(n) if j != me}
        beat = 0
        while not self.stopped.wait(PEER_POLL_S if beat else 0.0):
            beat += 1
            now = time.monotonic()
            try:
                client.key_value_set(f"maxlm/alive/{me}", str(beat), allow_overwrite=True)
                for j in seen:
                    value = _try_get(client, f"maxlm/alive/{j}")
                    if value != seen[j][0]:
                        seen[j] = (value, now)
                    elif now - seen[j][1] > self.timeout_s and _try_get(client, f"maxlm/done/{j}") is None:
                        _die(f"process {j} of {n} stopped responding {now - seen[j][1]:.0f} s ago (killed, out of "
                             "memory or its host went away); ending this process too. Rerun the same command on "
                             "every host to resume from the last checkpoint")
            except Exception as e:  # the coordination service (on process 0) is gone
                if not self.stopped.is_set():
                    _die(f"lost the run's coordinator (process 0 of {n}: {' '.join(str(e).split())[:120]}); ending "
                         "this process too. Rerun the same command on every host to resume from the last checkpoint")

    def finish(self) -> None:
        """This process is done (success or its own error): stop watching, and tell the others not to wait."""
        self.stopped.set()
        from jax._src import distributed as jax_distributed

        client = jax_distributed.global_state.client
        try:
            client.key_value_set(f"maxlm/done/{jax.process_index()}", "1", allow_overwrite=True)
        except Exception:  # the service is already gone: nobody is left to tell
            pass


def _try_get(client, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception as e:
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
            return None
        raise


_watchdog: PeerWatchdog | None = None


def finish() -> None:
    """Call when this process is about to end normally (or with its own one-line error)."""
    if _watchdog is not None:
        _watchdog.finish()


def await_peer_verdict() -> None:
    """After an unexpected error in a multi-process run (often a collective failing because a peer died): give
    the watchdog the time to recognise a dead peer and end the process with its one line; returns if it does not."""
    if _watchdog is not None and _watchdog.is_alive():
        _watchdog.join(_watchdog.timeout_s + 3 * PEER_POLL_S)


def _die(message: str) -> None:
    """One line and exit code 1, at once: the main thread may be blocked in a collective that never returns."""
    try:
        sys.stderr.write(f"maxlm: error: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(1)
