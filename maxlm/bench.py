"""`maxlm bench`: compile once, warm up, time N steps; report throughput against the analytic FLOP count."""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax

from maxlm.config import Config
from maxlm.mesh import mesh_context
from maxlm.model.layers import compute_dtype
from maxlm.train.builder import build_run
from maxlm.train.loop import throughput


def peak_bytes_per_device(compiled: Any) -> tuple[int | None, str]:
    """Runtime peak where the backend tracks it (GPU/TPU), else XLA's compile-time estimate for the step."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "runtime"
    try:
        m = compiled.memory_analysis()
        est = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        return int(est), "compiled_estimate"
    except Exception:  # some backends do not implement memory_analysis
        return None, "unavailable"


def bench(cfg: Config, steps: int, warmup: int = 2) -> dict[str, Any]:
    cfg.train.steps = max(cfg.train.steps, steps + warmup)
    run = build_run(cfg)
    batch = next(run.batches)  # one batch reused: measures the step, not the input pipeline
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    with mesh_context(run.mesh, run.rules):
        compiled = run.step_fn.jitted.lower(run.state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    state = run.state
    with mesh_context(run.mesh, run.rules):
        for _ in range(warmup):
            state, m = compiled(state, batch, rng)
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, m = compiled(state, batch, rng)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    peak, source = peak_bytes_per_device(compiled)
    tp = throughput(run, step_s)
    return {"compile_s": compile_s, "step_s_median": step_s, "tokens_per_s": tp["tokens_per_s"],
            "tflops_per_device": tp["tflops_per_device"], "mfu": tp["mfu"], "peak_bytes_per_device": peak,
            "peak_bytes_source": source, "flops_per_token": run.flops_per_token,
            "tokens_per_step": cfg.tokens_per_step, "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "mesh": dict(run.mesh.shape), "steps": steps,
            "compute_dtype": str(compute_dtype(cfg.model)),
            "final_loss": float(m["loss"])}
