"""`maxlm train`'s loop: step, log, evaluate, checkpoint, handle preemption and report. It only loops: the run it
loops over (mesh, model, state, step, data, evaluator) is assembled by `maxlm.train.builder`.

What a run survives:
  * Kill at any point: a run directory whose `checkpoint.dir` holds checkpoints resumes from the newest readable one
    with no flag (params, optimizer, step, PRNG key, every process's data position), so on the same mesh the losses
    that follow are bit-identical to an uninterrupted run. Rows of `metrics.jsonl` after the restored step (logged
    by the killed process, then recomputed) are dropped on resume, so each step appears once.
  * SIGTERM (TPU maintenance, GKE, SLURM): save at the next step boundary, wait for the write, return normally
    (exit code 0). Multi-process runs ask JAX's preemption sync point instead, so every host saves the same step.
  * NaN/Inf: the jitted step skips the update (see step.py); after `train.max_nonfinite_steps` in a row the run
    stops with TrainingError (exit code 1) and no checkpoint is written during a streak, so the last one is good.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
from tqdm import tqdm

from maxlm.checkpoint_format import checkpoint_dir
from maxlm.config import Config, config_to_yaml
from maxlm.train.builder import Run, build_run
from maxlm.train.checkpoint import PoisonedState, TrainingError
from maxlm.train.metrics import MetricsWriter
from maxlm.train.runlock import run_lock

log = logging.getLogger(__name__)

__all__ = ["NonFiniteError", "TrainingError", "describe", "train"]


class NonFiniteError(TrainingError):
    """`train.max_nonfinite_steps` consecutive steps had a NaN/Inf loss or gradient norm."""


class DiskFullError(TrainingError):
    """The disk filled up while the run wrote checkpoints or metrics; earlier complete checkpoints are intact."""


def _disk_full(e: BaseException | None) -> bool:
    """Whether ENOSPC is anywhere in the exception chain (orbax and tensorstore wrap it in their own errors)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _complete_steps(cfg: Config) -> list[int]:
    """Steps in `checkpoint.dir` that were finalised (orbax renames a step's directory to its number last)."""
    try:
        return sorted(int(n) for n in os.listdir(checkpoint_dir(cfg)) if n.isdigit())
    except OSError:
        return []


def throughput(run: Run, step_s: float) -> dict[str, float | None]:
    """tokens/s, TFLOP/s per device and MFU for a step time (all tokens in the rows, padding included)."""
    tokens = run.cfg.tokens_per_step
    tflops = run.flops_per_token * tokens / step_s / jax.device_count() / 1e12
    mfu = tflops * 1e12 / run.hardware.peak_flops if run.hardware else None
    return {"tokens_per_s": tokens / step_s, "tflops_per_device": tflops, "mfu": mfu}


class Preemption:
    """Turns a preemption notice into "save at the next step boundary, then stop".

    Single process: a SIGTERM handler sets a flag (the previous handler is put back afterwards). Multi-process:
    JAX's coordination service already listens for SIGTERM and agrees with every host on a step;
    `reached_preemption_sync_point` turns true at that same step everywhere, so all hosts save the same one.
    Our own handler is not installed then: it would replace JAX's.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self.multihost = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)

    def __enter__(self) -> "Preemption":
        if not self.multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        """Called once per step by every process, in order (the sync point requires that)."""
        if self.multihost:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def trim_metrics(run_dir: str, last_step: int) -> int:
    """Drops rows of metrics.jsonl logged after `last_step` (a killed run got further than its last checkpoint;
    the resumed run logs those steps again). Returns how many rows were dropped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if not isinstance(row, dict) or int(row.get("step", 0)) <= last_step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)


def train(cfg: Config, progress: bool = True, run: Run | None = None) -> dict[str, Any]:
    """Runs (or resumes) up to `cfg.train.steps` steps; returns a summary with every logged loss.

    `run` may be passed pre-built (tests feed it their own batches); by default it is built with resume on.
    The run directory (and `checkpoint.dir`) is locked first (maxlm.train.runlock): a second run on it stops with a
    ConfigError naming this one. Raises TrainingError (NonFiniteError, CheckpointError) when the run cannot go on;
    a pending checkpoint write is always finished first.
    """
    with run_lock(cfg), Preemption() as preemption:
        try:
            run = run or build_run(cfg, resume=True)
            return _loop(cfg, run, preemption, progress)
        except Exception as e:
            if not _disk_full(e):
                raise
            steps = _complete_steps(cfg)
            last = f"the last complete checkpoint is step {steps[-1]}" if steps else "no checkpoint was completed"
            raise DiskFullError(f"no space left on device while writing to {cfg.run_dir} or checkpoint.dir; {last}; "
                                "free space (or lower checkpoint.keep_last) and run the same command to resume"
                                ) from None


def _loop(cfg: Config, run: Run, preemption: Preemption, progress: bool) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    ckpt = run.checkpointer
    start = int(jax.device_get(run.state.step))
    if is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            f.write(config_to_yaml(cfg))
        if run.resumed_from is not None:
            trim_metrics(cfg.run_dir, start)
    writer = MetricsWriter(cfg.run_dir, enabled=is_main)
    limit = cfg.train.max_nonfinite_steps
    every = cfg.checkpoint.every
    losses: list[tuple[int, float]] = []
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (progress and is_main), unit="step",
               dynamic_ncols=True)
    state, rng = run.state, run.rng
    t_last, s_last = time.perf_counter(), start
    previous: tuple[int, Any] | None = None  # (step, metrics) of the step before, for the lagged streak check
    saved: list[int] = []
    stopped = "completed"

    def check_streak(step: int, nonfinite_run: Any) -> int:
        n = int(jax.device_get(nonfinite_run))
        if n >= limit:
            if ckpt is not None:
                ckpt.wait()
            last = f"; the last checkpoint is step {max(ckpt.steps())} in {ckpt.directory}" if ckpt and ckpt.steps() \
                else ""
            raise NonFiniteError(f"{n} consecutive non-finite steps (NaN/Inf loss or gradient norm) up to step "
                                 f"{step}; they were skipped, not applied{last}; lower optim.lr, raise "
                                 "train.max_nonfinite_steps or check the data, then rerun to resume")
        return n

    def save(step: int, *, periodic: bool) -> None:
        if ckpt is None:
            return
        streak = check_streak(step, state.nonfinite_run)  # waits for this step: saves are rare
        if periodic and streak:
            log.warning("step %d: not saving a checkpoint during a streak of %d non-finite steps", step, streak)
            return
        try:
            if ckpt.save(step, state, rng, run.data_iter):
                saved.append(step)
        except PoisonedState as e:  # never the newest checkpoint; the run only stops at its end
            if not periodic:
                raise
            log.warning("%s", e)

    try:
        for step in range(start, cfg.train.steps):
            state, metrics = run.step_fn(state, next(run.batches), rng)
            done = step + 1
            if previous is not None:  # the step before has finished or nearly: reading it keeps one step queued
                check_streak(previous[0], previous[1]["nonfinite_run"])
            previous = (done, metrics)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps or done == start + 1:
                param_norm = getattr(run.step_fn, "param_norm", None)  # not in the step: see step.py
                if param_norm is not None:
                    metrics = metrics | {"param_norm": param_norm(state.params)}
                metrics = jax.device_get(metrics)  # the only full host sync: once per logged step
                now = time.perf_counter()
                step_s = (now - t_last) / (done - s_last)
                t_last, s_last = now, done
                row = {k: float(v) for k, v in metrics.items()} | {"step_time_s": step_s} | throughput(run, step_s)
                # tokens with a training target this step (SFT: the response tokens), the loss's own unit count
                row |= {"trained_tokens": row["weight"], "trained_tokens_per_s": row["weight"] / step_s}
                if hasattr(run.data_iter, "stats"):
                    row |= run.data_iter.stats()
                writer.write(done, row)
                losses.append((done, row["loss"]))
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if run.evaluate is not None and cfg.train.eval_every and done % cfg.train.eval_every == 0:
                writer.write(done, {f"eval_{k}": v for k, v in run.evaluate(state).items()})
            bar.update(1)
            if preemption.reached(done):
                save(done, periodic=False)
                stopped = "preempted"
                log.warning("preemption notice: saved step %d, stopping", done)
                break
            if every and done % every == 0:
                save(done, periodic=True)
        else:
            if previous is not None:
                check_streak(previous[0], previous[1]["nonfinite_run"])
            if cfg.train.steps > start:
                save(cfg.train.steps, periodic=False)
    finally:
        bar.close()
        writer.close()
        if ckpt is not None:
            ckpt.close()  # waits for the last asynchronous write: a saved step is complete on return
    run.state = state
    history = _run_losses(cfg.run_dir) if run.resumed_from is not None else []
    whole = history or losses  # first/last loss of the whole run, across resumes
    return {"run_dir": cfg.run_dir, "steps": int(jax.device_get(state.step)), "start_step": start,
            "resumed_from": run.resumed_from, "stopped": stopped, "saved_steps": saved,
            "checkpoint_dir": ckpt.directory if ckpt else None, "losses": losses,
            "first_loss": whole[0][1] if whole else None, "last_loss": whole[-1][1] if whole else None,
            "run": run}


def _run_losses(run_dir: str) -> list[tuple[int, float]]:
    """(step, loss) of every training row in metrics.jsonl (empty where this process cannot read it)."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []
    return [(int(r["step"]), r["loss"]) for r in rows if isinstance(r, dict) and "loss" in r and "step" in r]


def describe(summary: dict[str, Any]) -> str:
    """The line `maxlm train` prints at the end."""
    parts = []
    trained = summary["steps"] - summary["start_step"]
    if summary["resumed_from"] is not None:
        parts.append(f"resumed from step {summary['resumed_from']}")
    if trained > 0:
        losses = (f": first loss {summary['first_loss']:.4f}, last loss {summary['last_loss']:.4f}"
                  if isinstance(summary["first_loss"], float) and isinstance(summary["last_loss"], float) else "")
        parts.append(f"trained {trained} steps (to step {summary['steps']}){losses}")
    else:
        parts.append(f"nothing to train: already at step {summary['steps']}")
    if summary["stopped"] == "preempted":
        parts.append(f"stopped by a preemption notice after saving step {summary['steps']}; run the same command "
                     "to resume")
    if summary["saved_steps"]:
        parts.append(f"checkpoint {summary['saved_steps'][-1]} in {summary['checkpoint_dir']}")
    parts.append(f"metrics in {os.path.join(summary['run_dir'], 'metrics.jsonl')}")
    return "; ".join(parts)
