"""The MoE block's dropless grouped matmuls (`jax.lax.ragged_dot`, maxlm's `blocked_grouped_matmul`) against the
same FLOPs as one dense matmul.

Run: python tests/benchmarks/bench_ragged_dot.py [--m 32768 --d 1024 --f 2816 --e 8]
Prints one JSON line: for each, forward and forward+backward times and TFLOP/s counted on the rows actually
present, and the largest error against a per-group einsum; and the dense matmul of the same rows. Use it to see
how XLA lowers ragged_dot on a backend (e.g. XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true on GPU).
Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.model.grouped_matmul import block_rows, blocked_grouped_matmul


def _time(fn, *args, reps: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=32768)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--f", type=int, default=2816)
    p.add_argument("--e", type=int, default=8)
    p.add_argument("--block", type=int, default=0, help="blocked_grouped_matmul's block (0: block_rows(m, e))")
    a = p.parse_args()
    rs = np.random.RandomState(0)
    sizes = rs.multinomial(a.m, rs.dirichlet(np.ones(a.e) * 2.0)).astype(np.int32)  # uneven, like a real router
    x = jnp.asarray(rs.randn(a.m, a.d), jnp.bfloat16)
    w = jnp.asarray(rs.randn(a.e, a.d, a.f) / np.sqrt(a.d), jnp.bfloat16)
    gs = jnp.asarray(sizes)
    block = a.block or block_rows(a.m, a.e)
    impls = {"ragged": lambda x, w, gs: jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32),
             "blocked": lambda x, w, gs: blocked_grouped_matmul(x, w, gs, block)}
    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    ref = np.concatenate([np.asarray(jnp.dot(x[bounds[e]:bounds[e + 1]], w[e], preferred_element_type=jnp.float32))
                          for e in range(a.e)])
    flops = 2.0 * a.m * a.d * a.f
    out: dict = {"device": jax.devices()[0].device_kind, "m": a.m, "d": a.d, "f": a.f, "e": a.e,
                 "block": block}
    for name, mm in impls.items():
        fwd = jax.jit(mm)
        bwd = jax.jit(jax.grad(lambda x, w, gs: jnp.sum(mm(x, w, gs).astype(jnp.float32) ** 2), argnums=(0, 1)))
        t_fwd, t_bwd = _time(fwd, x, w, gs), _time(bwd, x, w, gs)
        out |= {f"{name}_fwd_ms": t_fwd * 1e3, f"{name}_fwd_tflops": flops / t_fwd / 1e12,
                f"{name}_fwd_bwd_ms": t_bwd * 1e3, f"{name}_fwd_bwd_tflops": 3 * flops / t_bwd / 1e12,
                f"{name}_max_abs_err": float(np.max(np.abs(np.asarray(fwd(x, w, gs), np.float32) - ref)))}
    t_dense = _time(dense, x, w[0])
    out |= {"dense_fwd_ms": t_dense * 1e3, "dense_fwd_tflops": flops / t_dense / 1e12,
            "ref_max": float(np.abs(ref).max())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
