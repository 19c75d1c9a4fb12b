"""One training per run directory: a lock file that names its holder and cannot outlive it.

Two `maxlm train` on one `run_dir` (or one `checkpoint.dir`) would interleave their checkpoints and metrics, so
the second one must stop before it touches anything. `{dir}/maxlm.lock` holds an exclusive `flock` for as long as
the run lives and says who holds it (pid, host, start time, command) for the refusal message.

Stale locks: the kernel drops a `flock` when its process dies (SIGKILL included), so a killed run's lock file is
found unlocked and simply taken over. Where the file system cannot `flock` (some network mounts), liveness is
decided from what the file says: a holder on this host is alive while its pid runs with the recorded start time
(pid reuse is not mistaken for the holder); a holder on another host is alive while it keeps refreshing the file
(every HEARTBEAT_S seconds; stale after STALE_S).

Multi-process runs lock once: process 0 takes the locks and tells the others the outcome through JAX's
coordination service, so either every process goes on or every process stops with the same line.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Iterator

from maxlm.config import Config, ConfigError
from maxlm.config.paths import writable_dir

log = logging.getLogger(__name__)

LOCK_NAME = "maxlm.lock"
HEARTBEAT_S = 30.0
STALE_S = 4 * HEARTBEAT_S
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return start is None or _process_start(pid) in (None, start)


class DirLock:
    """An exclusive, self-describing lock on one directory (see the module docstring)."""

    def __init__(self, directory: str, key: str) -> None:
        self.directory = writable_dir(directory, key)
        self.key = key
        self.path = os.path.join(self.directory, LOCK_NAME)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict[str, Any]) -> ConfigError:
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
               f"{holder.get('command', '?')}") if holder else "a process that has not written its details yet"
        return ConfigError(f"{self.key}={self.directory} is in use by another maxlm run ({who}); wait for it to "
                           f"finish or stop it, or give this run another {self.key}")

    def _alive_without_flock(self, holder: dict[str, Any]) -> bool:
        if not holder:
            return False
        if holder.get("host") == socket.gethostname():
            return _pid_alive(int(holder.get("pid", -1)), holder.get("pid_start"))
        try:
            return time.time() - os.stat(self.path).st_mtime < STALE_S
        except OSError:
            return False

    def acquire(self) -> "DirLock":
        for _ in range(5):  # retried only when the file is replaced under us (a holder releasing concurrently)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConfigError(f"{self.key}={self.directory}: cannot create {LOCK_NAME} ({e.strerror}); choose "
                                  f"a writable {self.key}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self._holder()) from None
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise
                holder = self._holder()  # no flock here: decide from the recorded holder
                if self._alive_without_flock(holder) and holder.get("pid") != os.getpid():
                    os.close(fd)
                    raise self._refuse(holder) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked the file after we opened it: lock the new one
                os.close(fd)
                continue
            stale = self._holder()
            if stale:
                log.info("%s: taking over the lock of pid %s on %s (no longer running)", self.directory,
                         stale.get("pid"), stale.get("host"))
            self._fd = fd
            self._write()
            self._heartbeat = threading.Thread(target=self._beat, name="maxlm-lock-heartbeat", daemon=True)
            self._heartbeat.start()
            return self
        raise ConfigError(f"{self.key}={self.directory}: could not take {LOCK_NAME} (it keeps being replaced); is "
                          "another run starting on it?")

    def _write(self) -> None:
        assert self._fd is not None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _process_start(os.getpid()),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join(["maxlm", *sys.argv[1:]])[:300]}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # unlinked while still locked: a waiter re-checks the inode (see acquire)
        os.close(self._fd)
        self._fd = None


def lock_paths(cfg: Config) -> list[tuple[str, str]]:
    """(directory, config key) pairs a training run writes: `run_dir`, and `checkpoint.dir` when it is a local
    directory of its own (URLs such as gs:// cannot be locked this way and are skipped)."""
    paths = [(os.path.abspath(os.path.expanduser(cfg.run_dir)), "run_dir")]
    ckpt = cfg.checkpoint.dir
    if ckpt and "://" not in ckpt:
        ckpt = os.path.abspath(os.path.expanduser(ckpt))
        if ckpt != paths[0][0]:
            paths.append((ckpt, "checkpoint.dir"))
    return paths


@contextlib.contextmanager
def run_lock(cfg: Config) -> Iterator[None]:
    """Holds the locks of `lock_paths(cfg)` for the duration of a training run (see the module docstring).

    Raises ConfigError (one line, exit 2) naming the other run when one is alive, or naming the key when a
    directory cannot be created or written.
    """
    import jax

    held: list[DirLock] = []
    error: str | None = None
    try:
        if jax.process_index() == 0:
            try:
                for path, key in lock_paths(cfg):
                    held.append(DirLock(path, key).acquire())
                if not cfg.checkpoint.dir:  # the default {run_dir}/checkpoints, covered by run_dir's lock
                    writable_dir(os.path.join(held[0].directory, "checkpoints"), "checkpoint.dir")
            except ConfigError as e:
                error = str(e)
        if jax.process_count() > 1:
            error = _agree_on_error("maxlm_run_lock", error)
        if error is not None:
            raise ConfigError(error)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def _agree_on_error(key: str, error: str | None, timeout_s: float = 300.0) -> str | None:
    """Process 0's `error` (None: no error) on every process, through the coordination service's key-value store,
    so that a check only process 0 makes stops every process with the same line."""
    import jax
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        return error
    if jax.process_index() == 0:
        client.key_value_set(key, "ok" if error is None else "error:" + error)
        return error
    value = client.blocking_key_value_get(key, int(timeout_s * 1000))
    return None if value == "ok" else value.split(":", 1)[1]
