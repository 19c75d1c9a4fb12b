"""`maxlm train`: build everything from the config, then step, log and report.

Order matters for users: the config, the data and the shapes are checked before anything compiles, so every
mistake costs a second, not a compile.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import jax
import numpy as np
from tqdm import tqdm

from maxlm.config import Config, config_to_yaml, validate
from maxlm.flops import HARDWARE, Hardware, detect_hardware, flops_per_token
from maxlm.mesh import batch_sharding, build_mesh, logical_rules, make_global_batch
from maxlm.model import Decoder
from maxlm.train.losses import OBJECTIVES
from maxlm.train.metrics import MetricsWriter
from maxlm.train.optimizer import make_optimizer
from maxlm.train.state import StateLayout, TrainState, init_state, state_layout
from maxlm.train.step import StepFn, make_train_step


@dataclass
class Run:
    """Everything a training or benchmark run needs, built and checked in one place."""

    cfg: Config
    mesh: jax.sharding.Mesh
    rules: Any
    model: Decoder
    layout: StateLayout
    state: TrainState
    step_fn: StepFn
    batches: Iterator[dict[str, jax.Array]]
    data_iter: Any  # the grain iterator (its state goes into checkpoints)
    hardware: Hardware | None
    flops_per_token: float


def resolve_hardware(cfg: Config) -> Hardware | None:
    if cfg.train.hardware == "auto":
        return detect_hardware(jax.devices()[0].device_kind)
    if cfg.train.hardware in ("cpu", "none"):
        return None
    return HARDWARE[cfg.train.hardware]


def enable_compile_cache(path: str) -> None:
    """Persistent XLA cache: a resumed or repeated run loads its executables instead of compiling them."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def build_run(cfg: Config) -> Run:
    validate(cfg, jax.device_count())
    enable_compile_cache(cfg.train.compile_cache_dir)
    from maxlm.data.pipeline import build_dataset  # grain is imported only when data is needed

    n_proc, proc = jax.process_count(), jax.process_index()
    dataset = build_dataset(cfg.data, vocab_size=cfg.model.vocab_size, batch_size=cfg.train.global_batch_size // n_proc,
                            seed=cfg.seed, shard_index=proc, shard_count=n_proc)
    mesh = build_mesh(cfg)
    rules = logical_rules(cfg)
    model = Decoder(cfg.model)
    tx, schedule = make_optimizer(cfg)
    layout = state_layout(cfg, model, tx, mesh, rules)
    loss_fn = OBJECTIVES[cfg.train.objective](cfg, model)
    bsh = batch_sharding(mesh, rules)
    step_fn = make_train_step(loss_fn, tx, schedule, cfg.train.grad_accum, layout.shardings, bsh, mesh, rules)
    state = init_state(cfg, model, tx, layout, mesh, rules, jax.random.key(cfg.seed))
    data_iter = iter(dataset)
    batches = (make_global_batch(b, bsh) for b in data_iter)
    return Run(cfg=cfg, mesh=mesh, rules=rules, model=model, layout=layout, state=state, step_fn=step_fn,
               batches=batches, data_iter=data_iter, hardware=resolve_hardware(cfg),
               flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len))


def throughput(run: Run, step_s: float) -> dict[str, float | None]:
    """tokens/s, TFLOP/s per device and MFU for a step time (all tokens in the rows, padding included)."""
    tokens = run.cfg.tokens_per_step
    tflops = run.flops_per_token * tokens / step_s / jax.device_count() / 1e12
    mfu = tflops * 1e12 / run.hardware.peak_flops if run.hardware else None
    return {"tokens_per_s": tokens / step_s, "tflops_per_device": tflops, "mfu": mfu}


def train(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Runs `cfg.train.steps` steps; returns a summary with every logged loss."""
    run = build_run(cfg)
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            f.write(config_to_yaml(cfg))
    writer = MetricsWriter(cfg.run_dir, enabled=is_main)
    rng = jax.random.key(cfg.seed + 1)
    losses: list[tuple[int, float]] = []
    start = int(jax.device_get(run.state.step))
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (progress and is_main), unit="step",
               dynamic_ncols=True)
    state = run.state
    t_last, s_last = time.perf_counter(), start
    try:
        for step in range(start, cfg.train.steps):
            state, metrics = run.step_fn(state, next(run.batches), rng)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps or done == start + 1:
                metrics = jax.device_get(metrics)  # the only host sync: once per logged step
                now = time.perf_counter()
                step_s = (now - t_last) / (done - s_last)
                t_last, s_last = now, done
                row = {k: float(v) for k, v in metrics.items()} | {"step_time_s": step_s} | throughput(run, step_s)
                writer.write(done, row)
                losses.append((done, row["loss"]))
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
    finally:
        bar.close()
        writer.close()
    run.state = state
    return {"run_dir": cfg.run_dir, "steps": cfg.train.steps, "losses": losses,
            "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
            "run": run}
