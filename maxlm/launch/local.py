"""N maxlm processes on this machine, each with its own fake CPU devices, joined over 127.0.0.1.

This is the multi-host code path (per-process data rows, global arrays, collectives across processes, the
preemption sync point, per-process checkpoint data state) without a cluster. The launcher supervises its children
so a run never hangs on a dead peer: once any process exits with an error, the others get SIGTERM after
`GRACE_S` and SIGKILL after `KILL_S` more, and the launcher exits non-zero, naming the process that failed first.
A SIGTERM/SIGINT sent to the launcher is forwarded to every process (maxlm saves at the next step boundary).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

# After one process fails, how long the others may take to notice (their own collective error or the
# coordination service's heartbeat) before they are terminated, then killed.
GRACE_S = 10.0
KILL_S = 10.0
# Heartbeat timeout handed to jax.distributed.initialize (maxlm.distributed reads it): a peer that stops
# answering is noticed within this time even when no launcher supervises the processes.
HEARTBEAT_S = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalLaunch:
    """What `maxlm launch local` runs: `argv` in `processes` processes of `devices_per_process` CPU devices."""

    argv: list[str]
    processes: int
    devices_per_process: int
    port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, i: int) -> dict[str, str]:
        """Environment of process i: the coordinator, its id, its devices (CPU only: no accelerator probing)."""
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        return {"MAXLM_COORDINATOR": f"127.0.0.1:{self.port}", "MAXLM_NUM_PROCESSES": str(self.processes),
                "MAXLM_PROCESS_ID": str(i), "MAXLM_CPU_DEVICES": str(self.devices_per_process),
                "MAXLM_HEARTBEAT_TIMEOUT": os.environ.get("MAXLM_HEARTBEAT_TIMEOUT", str(HEARTBEAT_S)),
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={self.devices_per_process}"]),
                **self.extra_env}

    def commands(self) -> list[str]:
        """The shell lines the launch runs (what --dry-run prints)."""
        return [" ".join(f"{k}={shlex.quote(v)}" for k, v in self.env(i).items()) + " " + shlex.join(self.argv)
                for i in range(self.processes)]


def run(launch: LocalLaunch, *, out=sys.stderr) -> int:
    """Starts the processes and supervises them; returns 0 when all succeed, else the first failure's code."""
    launch.port = launch.port or free_port()
    procs = [subprocess.Popen(launch.argv, env=os.environ | launch.env(i)) for i in range(launch.processes)]
    print(f"maxlm launch: {launch.processes} processes ({', '.join(f'{i}: pid {p.pid}' for i, p in enumerate(procs))})"
          f" on 127.0.0.1:{launch.port}", file=out, flush=True)

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failed: tuple[int, int] | None = None  # (process, exit code) of the first failure
    deadline = None
    try:
        # Poll every child each round (`any` over a generator would stop at the first live one and never see a
        # later process die).
        while None in [p.poll() for p in procs]:
            if failed is None:
                for i, p in enumerate(procs):
                    if p.returncode not in (None, 0):
                        failed, deadline = (i, p.returncode), time.monotonic() + GRACE_S
                        print(f"maxlm launch: process {i} exited with code {p.returncode}; stopping the others",
                              file=out, flush=True)
                        break
            elif deadline is not None and time.monotonic() > deadline:
                running = [p for p in procs if p.poll() is None]
                if deadline > 0:
                    for p in running:
                        p.terminate()
                    deadline = -(time.monotonic() + KILL_S)  # negative: the kill deadline
                elif time.monotonic() > -deadline:
                    for p in running:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if failed is None:
        failed = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode), None)
    if failed is not None:
        print(f"maxlm launch: error: process {failed[0]} of {launch.processes} failed (exit code {failed[1]})",
              file=out, flush=True)
        return failed[1] if failed[1] > 0 else 1
    return 0
