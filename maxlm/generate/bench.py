"""`maxlm bench-generate CONFIG [key=value ...]`: prefill and decode throughput, optionally beside transformers.

For each batch size: random prompts of `--prompt-len` tokens complete `--new-tokens` tokens greedily (never
stopping early: no eos). Reported after a warm-up run (which compiles): prefill tokens/s (prompt tokens over the
prefill's time), decode tokens/s per sequence and in total, and ms per decode step (one token of every row).

`--transformers` runs transformers' `generate(do_sample=False)` on the same weights in the same process: the
config's `load_parameters_from` when it is a Hugging Face directory, else a random model of the config's shape
written by transformers and loaded into maxlm by the converter. Its prefill is one forward pass of the prompts; its
decode time is generate's time minus that. On a GPU, `hbm_fraction` is the bytes of weights and KV cache read per
decode step over the step time, as a fraction of the device's memory bandwidth (maxlm.flops.HARDWARE).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from maxlm.config import Config, load_config, resolve_config_path

REPEATS = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxlm bench-generate", description="Decode throughput (and transformers').")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--transformers", action="store_true", help="also time transformers' generate")
    p.add_argument("--json", action="store_true")
    return p


def write_hf_model(cfg: Config, out_dir: str) -> None:
    """A random transformers model of the config's shape (float32), saved where maxlm's converter reads it."""
    import torch
    import transformers

    from maxlm.convert.hf import hf_config_from_model

    hf_cfg = hf_config_from_model(cfg.model, max_position_embeddings=max(cfg.data.seq_len, 4096), dtype="float32")
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    torch.manual_seed(cfg.seed)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(out_dir)


def _stats(rows: int, prompt_len: int, new: int, prefill_s: float, decode_s: float, steps: int) -> dict[str, float]:
    return {"batch": rows, "prefill_tokens_per_s": rows * prompt_len / prefill_s,
            "decode_tokens_per_s_total": rows * steps / decode_s, "decode_tokens_per_s_per_seq": steps / decode_s,
            "ms_per_token": 1000 * decode_s / steps, "prefill_s": prefill_s, "decode_s": decode_s}


def bench_maxlm(cfg: Config, prompts: dict[int, np.ndarray], new: int) -> dict[int, dict[str, float]]:
    import jax

    from maxlm.generate.cli import make_engine
    from maxlm.generate.engine import Request
    from maxlm.generate.load import load_model

    loaded = load_model(cfg)
    out = {}
    for B, ids in prompts.items():
        cfg.generate.batch_size = B
        engine = make_engine(loaded, None)
        engine.batch_size = B
        reqs = [Request(list(map(int, row)), new) for row in ids]
        engine.generate(reqs)  # compiles
        engine.record_timings = True
        for _ in range(REPEATS):
            engine.generate(reqs)
        pre = statistics.median(t["prefill_s"] for t in engine.timings)
        dec = statistics.median(t["decode_s"] for t in engine.timings)
        out[B] = _stats(B, ids.shape[1], new, pre, dec, engine.timings[0]["decode_steps"])
        out[B] |= _hbm(cfg, loaded.params, B, ids.shape[1] + new, out[B]["ms_per_token"] / 1000, jax)
    return out


def _hbm(cfg: Config, params: Any, rows: int, length: int, step_s: float, jax: Any) -> dict[str, float]:
    """Bytes a decode step must read (all weights once, the K/V cache of every row) and, on an accelerator with a
    known bandwidth, the fraction of it that the measured step time achieves."""
    from maxlm.flops import detect_hardware
    from maxlm.model.layers import compute_dtype

    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    m = cfg.model
    kv = 2 * m.n_layers * rows * length * m.n_kv_heads * (m.head_dim or m.d_model // m.n_heads)
    cache_bytes = kv * np.dtype(compute_dtype(m)).itemsize
    out = {"bytes_per_step": float(weight_bytes + cache_bytes)}
    hw = detect_hardware(jax.devices()[0].device_kind)
    bw = hw.hbm_bandwidth if hw else 0.0
    if bw:
        out["hbm_fraction"] = out["bytes_per_step"] / step_s / (bw * jax.device_count())
    return out


def bench_transformers(hf_dir: str, prompts: dict[int, np.ndarray], new: int) -> dict[int, dict[str, float]]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = {}
    for B, ids in prompts.items():
        x = torch.tensor(ids, dtype=torch.long)
        mask = torch.ones_like(x)
        kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        pre, tot = [], []
        with torch.no_grad():
            model.generate(x, **kw)  # warm-up
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                model(x, attention_mask=mask, use_cache=True)
                pre.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                model.generate(x, **kw)
                tot.append(time.perf_counter() - t0)
        p, t = statistics.median(pre), statistics.median(tot)
        out[B] = _stats(B, ids.shape[1], new, p, t - p, new - 1)
    return out


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    cfg = load_config(resolve_config_path(args.config), list(args.overrides) + [
        f"generate.max_length={args.prompt_len + args.new_tokens + 1}"])
    rs = np.random.RandomState(0)
    prompts = {B: rs.randint(4, cfg.model.vocab_size, size=(B, args.prompt_len)) for B in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        from maxlm.convert.hf import is_hf_dir

        hf_dir = cfg.load_parameters_from if cfg.load_parameters_from and is_hf_dir(cfg.load_parameters_from) else ""
        if args.transformers and not hf_dir:
            hf_dir = os.path.join(tmp, "hf")
            write_hf_model(cfg, hf_dir)
            cfg.load_parameters_from = hf_dir
        report: dict[str, Any] = {"config": args.config, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                  "maxlm": bench_maxlm(cfg, prompts, args.new_tokens)}
        if args.transformers:
            report["transformers"] = bench_transformers(hf_dir, prompts, args.new_tokens)
    import jax

    report["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['devices']}; prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
    print(f"{'engine':>12} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'per seq':>9} {'ms/token':>9}")
    for name in ("maxlm", "transformers"):
        for B, r in report.get(name, {}).items():
            print(f"{name:>12} {B:>5} {r['prefill_tokens_per_s']:>14.0f} {r['decode_tokens_per_s_total']:>13.0f} "
                  f"{r['decode_tokens_per_s_per_seq']:>9.1f} {r['ms_per_token']:>9.2f}")
    return 0
