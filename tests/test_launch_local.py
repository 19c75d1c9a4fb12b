"""The multi-host path on one machine, in the default suite: `maxlm launch local` with 2 processes x 4 CPU devices.

It trains `tiny`, is stopped by SIGTERM (forwarded to both processes, which agree on a step and save it), resumes,
and its losses match the 1 x 8-device single-process run's step for step; a process killed mid-run makes the
launcher stop the other and exit with an error in bounded time. Slow-ish (two processes compile the step on 2
cores); the compilation cache of the session is shared by the launches.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_config
from maxlm.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
STEPS = 36
ARGS = ["tiny", f"train.steps={STEPS}", "train.log_every=1", "checkpoint.every=0", "train.global_batch_size=16"]


def _launch(run_dir: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # the launcher sets each process's device count
    return subprocess.Popen([sys.executable, "-m", "maxlm", "launch", "local", "--processes", "2",
                             "--devices-per-process", "4", *ARGS, f"run_dir={run_dir}", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 900) -> None:
    end = time.monotonic() + timeout
    while max(_losses(run_dir), default=0) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"no step {step} logged in {timeout} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_two_processes_stop_resume_and_match_one_process(tmp_path: Path) -> None:
    reference = train(tiny_config(*ARGS[1:], f"run_dir={tmp_path / 'single'}"), progress=False)
    want = dict(reference["losses"])
    assert len(want) == STEPS

    run_dir = tmp_path / "mp"
    first = _launch(run_dir)
    _wait_for_step(run_dir, first, 2)
    first.send_signal(signal.SIGTERM)  # the launcher forwards it; JAX's preemption sync picks one step for both
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert "stopped by a preemption notice" in out, out
    stopped = int(re.search(r"after saving step (\d+)", out).group(1))
    assert stopped < STEPS

    second = _launch(run_dir)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    assert f"resumed from step {stopped}" in out, out
    got = _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Same rows, same math: only the order of cross-process reductions differs (gloo vs in-process).
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-5)


@pytest.mark.slow
def test_a_dead_process_stops_the_launch_with_an_error(tmp_path: Path) -> None:
    proc = _launch(tmp_path)
    _wait_for_step(tmp_path, proc, 1)
    time.sleep(0.5)
    # The launcher's first stderr line names the children's pids.
    os.kill(_child_pid(proc), signal.SIGKILL)
    killed = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - killed < 60
    assert "process 1 of 2 failed" in err, err[-3000:]


def _child_pid(proc: subprocess.Popen) -> int:
    line = proc.stderr.readline()
    while "maxlm launch:" not in line:
        line = proc.stderr.readline()
    return int(re.search(r"1: pid (\d+)", line).group(1))
