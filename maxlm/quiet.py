"""Keep library noise off the user's terminal, so maxlm's own one-line messages are what they read.

Silenced during normal operation (set MAXLM_LIBRARY_LOGS=1 to see everything again):
  * absl-routed Python logs of orbax/grain ("WARNING:absl:...", and ERROR records with tracebacks for failures
    that maxlm already reports in one line, e.g. an unreadable checkpoint it falls back from);
  * asyncio's "Event loop is closed" / "Task exception was never retrieved" / "coroutine ... was never awaited"
    reports, printed when orbax's private event loop is torn down with work still pending (after a damaged step
    was read, or a save failed), up to dozens per fallback;
  * the C++ (TSL/absl) INFO and WARNING lines of jaxlib and tensorstore (TF_CPP_MIN_LOG_LEVEL, only if unset);
  * a full disk (ENOSPC) hit by a library's background writer thread (TensorBoard's event writer): the run's own
    writes hit the same disk and `maxlm train` reports it once, in one line (maxlm.train.loop.DiskFullError).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import warnings
from typing import Any

_installed = False


def _is_event_loop_noise(unraisable: Any) -> bool:
    exc = getattr(unraisable, "exc_value", None)
    text = str(exc) if exc is not None else ""
    return (isinstance(exc, RuntimeError) and "Event loop is closed" in text) or "asyncio" in repr(
        getattr(unraisable, "object", ""))


def quiet_libraries() -> None:
    """Installs the filters above once per process (the CLI calls it before importing jax)."""
    global _installed
    if _installed or os.environ.get("MAXLM_LIBRARY_LOGS") == "1":
        return
    _installed = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("absl", "asyncio", "orbax", "tensorstore", "jax._src.distributed"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_event_loop_noise(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    previous_thread_hook = threading.excepthook

    def thread_hook(args: Any) -> None:
        if not (isinstance(args.exc_value, OSError) and args.exc_value.errno == errno.ENOSPC):
            previous_thread_hook(args)

    threading.excepthook = thread_hook
