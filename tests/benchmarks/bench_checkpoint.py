"""Checkpoint costs: save/restore time, step time while an async save runs, bytes on disk vs in memory, and the
peak host memory of `maxlm convert` on a synthetic Llama.

Run: .venv/bin/python tests/benchmarks/bench_checkpoint.py [--configs tiny demo] [--steps 20]
         [--convert-layers 8 --convert-d 2048]   (0 layers: skip the conversion measurement)
Prints one JSON line per measurement. Not part of `make test` (8 fake CPU devices by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def _nbytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def bench_config(name: str, steps: int) -> dict:
    import jax

    from maxlm.config import load_config, resolve_config_path
    from maxlm.mesh import mesh_context
    from maxlm.train.checkpoint import Checkpointer
    from maxlm.train.builder import build_run

    out: dict = {"config": name}
    tmp = tempfile.mkdtemp(prefix="maxlm-bench-ckpt-")
    cfg = load_config(resolve_config_path(name), [f"run_dir={tmp}", f"train.steps={10 * steps}"])
    run = build_run(cfg)
    batch = next(run.batches)
    with mesh_context(run.mesh, run.rules):
        step = run.step_fn.jitted.lower(run.state, batch, run.rng).compile()

    def timed_steps(state, n, stop=None):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            state, m = step(state, batch, run.rng)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
            if stop is not None and stop():
                break
        return state, times

    state, _ = timed_steps(run.state, 3)  # warm up
    state, base = timed_steps(state, steps)
    out["param_bytes"], out["opt_state_bytes"] = _nbytes(state.params), _nbytes(state.opt_state)
    out["step_s_median"] = statistics.median(base)

    cfg.checkpoint.async_save = False
    with Checkpointer(cfg, run.mesh) as ckpt:
        t = time.perf_counter()
        ckpt.save(0, state, run.rng, run.data_iter)  # the first save also starts orbax's machinery
        out["save_first_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ckpt.save(1, state, run.rng, run.data_iter)
        ckpt.wait()
        out["save_sync_s"] = time.perf_counter() - t
    step_dir = os.path.join(tmp, "checkpoints", "1")
    out["disk_bytes"] = _du(step_dir)
    out["disk_bytes_by_item"] = {item: _du(os.path.join(step_dir, item)) for item in sorted(os.listdir(step_dir))
                                 if os.path.isdir(os.path.join(step_dir, item))}

    cfg.checkpoint.async_save = True
    with Checkpointer(cfg, run.mesh) as ckpt:
        t = time.perf_counter()
        ckpt.save(2, state, run.rng, run.data_iter)
        out["save_async_blocking_s"] = time.perf_counter() - t
        state, during = timed_steps(state, 1000, stop=lambda: not ckpt.manager.is_saving_in_progress())
        ckpt.wait()
        out["save_async_total_s"] = time.perf_counter() - t
    out["steps_during_async_save"] = len(during)
    out["step_s_during_async_save_median"] = statistics.median(during)

    with Checkpointer(cfg, run.mesh) as ckpt:
        t = time.perf_counter()
        restored = ckpt.restore(run.layout, None)
        jax.block_until_ready(restored.state)
        out["restore_s"] = time.perf_counter() - t
    shutil.rmtree(tmp)
    return out


def _write_synthetic_llama(path: str, layers: int, d: int) -> int:
    """A bf16 Llama-shaped safetensors model written tensor by tensor (random normal), without torch."""
    import ml_dtypes
    import numpy as np

    from maxlm.convert.safetensors_io import PlannedTensor, SafetensorsWriter

    heads, kv, ffn, vocab = d // 128, max(d // 512, 1), int(d * 8 / 3) // 256 * 256, 32000
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": d,
          "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 128,
          "intermediate_size": ffn, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (heads * 128, d), p + "self_attn.k_proj.weight": (kv * 128, d),
                   p + "self_attn.v_proj.weight": (kv * 128, d), p + "self_attn.o_proj.weight": (d, heads * 128),
                   p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
                   p + "mlp.down_proj.weight": (d, ffn)}
    bf16 = np.dtype(ml_dtypes.bfloat16)
    writer = SafetensorsWriter(path, [PlannedTensor(n, s, bf16) for n, s in shapes.items()], 2 * 2**30)
    rs = np.random.default_rng(0)
    for n, s in shapes.items():
        writer.write(n, (rs.standard_normal(s, np.float32) * 0.02).astype(bf16))
    writer.close()
    return sum(int(np.prod(s)) for s in shapes.values())


def bench_convert(layers: int, d: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="maxlm-bench-convert-")
    params = _write_synthetic_llama(os.path.join(tmp, "hf"), layers, d)
    out = {"convert_params": params, "hf_bf16_bytes": _du(os.path.join(tmp, "hf"))}
    for what, args in [("from_hf", ["from-hf", os.path.join(tmp, "hf"), os.path.join(tmp, "ck")]),
                       ("to_hf", ["to-hf", os.path.join(tmp, "ck"), os.path.join(tmp, "hf2"), "--dtype", "bfloat16"])]:
        # Peak RSS of a fresh interpreter: VmHWM of its own address space (Linux carries ru_maxrss over exec from
        # the parent, which would report this benchmark's own size).
        code = ("import sys; from maxlm.convert.cli import main; rc = main(sys.argv[1:]); "
                "print('PEAK_RSS_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); "
                "sys.exit(rc)")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
        out[f"{what}_s"] = time.perf_counter() - t
        out[f"{what}_peak_rss_bytes"] = int(proc.stdout.split("PEAK_RSS_KB")[1].split()[0]) * 1024
    out["maxlm_f32_bytes"] = _du(os.path.join(tmp, "ck"))
    base = subprocess.run([sys.executable, "-c", "import maxlm.convert.hf, jax; jax.numpy.zeros(1); "
                           "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"],
                          capture_output=True, text=True, check=True)
    out["interpreter_baseline_rss_bytes"] = int(base.stdout.split()[-1]) * 1024
    shutil.rmtree(tmp)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="*", default=["tiny", "demo"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--convert-layers", type=int, default=8)
    p.add_argument("--convert-d", type=int, default=2048)
    args = p.parse_args()
    for name in args.configs:
        print(json.dumps(bench_config(name, args.steps)), flush=True)
    if args.convert_layers:
        print(json.dumps(bench_convert(args.convert_layers, args.convert_d)), flush=True)


if __name__ == "__main__":
    main()
