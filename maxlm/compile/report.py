"""What a compiled step says about a run before it is paid for: memory, FLOPs, collectives, compile time.

Memory is XLA's own buffer assignment for one device (`Compiled.memory_analysis()`): arguments (the train state
and batch shard), outputs, the part of the outputs aliased to donated arguments, temporaries, generated code,
and the peak. FLOPs come from XLA's cost analysis of the optimised per-device program (for GPU targets run on the host
client, since the compile-only GPU client has no cost model); beside them,
maxlm's analytic count (maxlm.flops.flops_per_token, the MFU numerator), whose ratio shows recomputation (remat)
and anything the analytic model leaves out. XLA's cost analysis counts the body of a loop once: with scanned
layers (`model.scan_layers`) and gradient accumulation its figure covers one layer of one microbatch plus the
unrolled parts, so the ratio is only meaningful for unscanned programs. Collectives are counted in the optimised
HLO by kind (each instruction once, loop bodies included once), with the bytes of their results.
"""

from __future__ import annotations

import re
from typing import Any

from maxlm.compile.program import Compiled
from maxlm.compile.targets import Target
from maxlm.config import Config
from maxlm.flops import flops_per_token

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
# `%name = SHAPE kind(` or `%name = (SHAPE, ...) kind-start(`: the result shape is what precedes the opcode.
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def _bytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shape_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives in an optimised HLO module (async pairs counted once)."""
    out: dict[str, dict[str, int]] = {}
    for shape, kind, _ in (m.groups() for line in hlo_text.splitlines() if (m := _OP.search(line))):
        entry = out.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += _bytes(shape)
    return dict(sorted(out.items()))


def _xla_flops(compiled: Compiled) -> tuple[float | None, str]:
    """FLOPs of the optimised per-device program. The GPU compile-only client has no cost model, so its module is
    costed by XLA's HLO cost analysis on the host (CPU) client; that entry point is internal to jaxlib, hence the
    guard."""
    cost = compiled.executable.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if isinstance(cost, dict) and cost.get("flops"):
        return float(cost["flops"]), "xla cost analysis"
    try:
        import jax
        from jax._src.lib import xla_client

        module = compiled.executable.runtime_executable().hlo_modules()[0]
        cpu = jax.devices("cpu")[0].client
        flops = xla_client._xla.hlo_module_cost_analysis(cpu, module).get("flops")
        return (float(flops), "xla hlo cost analysis on the host") if flops else (None, "unavailable")
    except Exception:  # an internal API that moved: report no number rather than a wrong one
        return None, "unavailable"


def analyse(cfg: Config, target: Target, compiled: Compiled) -> dict[str, Any]:
    """The `maxlm compile --json` object."""
    mem = compiled.executable.memory_analysis()
    peak = int(getattr(mem, "peak_memory_in_bytes", 0)) or int(
        mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes)
    analytic = flops_per_token(cfg.model, cfg.data.seq_len) * cfg.tokens_per_step / target.devices
    xla, source = _xla_flops(compiled)
    out: dict[str, Any] = {
        "target": target.name, "platform": target.platform, "chip": target.chip, "devices": target.devices,
        "hosts": target.hosts, "slices": target.slices, "mesh": compiled.mesh_shape,
        "model": {"dtype": cfg.model.dtype, "attention": cfg.model.attention, "remat": cfg.model.remat,
                  "ffn": cfg.model.ffn},
        "global_batch_size": cfg.train.global_batch_size, "seq_len": cfg.data.seq_len,
        "grad_accum": cfg.train.grad_accum,
        "argument_bytes_per_device": int(mem.argument_size_in_bytes),
        "output_bytes_per_device": int(mem.output_size_in_bytes),
        "alias_bytes_per_device": int(mem.alias_size_in_bytes),
        "temp_bytes_per_device": int(mem.temp_size_in_bytes),
        "code_bytes_per_device": int(mem.generated_code_size_in_bytes),
        "peak_bytes_per_device": peak,
        "hbm_bytes_per_device": int(target.hbm_bytes),
        "fits": peak <= target.hbm_bytes,
        "xla_flops_per_device": xla, "xla_flops_source": source,
        "analytic_flops_per_device": analytic,
        "flops_ratio": xla / analytic if xla else None,
        "collectives": collectives(compiled.executable.as_text()),
        "compile_s": round(compiled.compile_s, 2), "lower_s": round(compiled.lower_s, 2),
    }
    return out


def _gib(x: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= size or unit == "KiB":
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def render(r: dict[str, Any]) -> str:
    """The human-readable report."""
    mesh = " x ".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1) or "1 device"
    lines = [f"target      {r['target']}: {r['devices']} x {r['chip']} on {r['hosts']} host(s)"
             + (f", {r['slices']} slices" if r["slices"] > 1 else ""),
             f"mesh        {mesh}; batch {r['global_batch_size']} x {r['seq_len']}, grad_accum {r['grad_accum']}, "
             f"{r['model']['dtype']}, attention {r['model']['attention']}, remat {r['model']['remat']}",
             "memory per device (XLA):",
             f"  arguments {_gib(r['argument_bytes_per_device'])}, outputs {_gib(r['output_bytes_per_device'])} "
             f"(aliased {_gib(r['alias_bytes_per_device'])}), temporaries {_gib(r['temp_bytes_per_device'])}, "
             f"code {_gib(r['code_bytes_per_device'])}",
             f"  peak {_gib(r['peak_bytes_per_device'])} of {_gib(r['hbm_bytes_per_device'])} HBM: "
             + ("fits" if r["fits"] else "DOES NOT FIT")]
    xla = f"{r['xla_flops_per_device']:.3e}" if r["xla_flops_per_device"] else "n/a"
    ratio = f" ({r['flops_ratio']:.2f} x analytic)" if r["flops_ratio"] else ""
    lines.append(f"FLOPs/step/device: XLA {xla}{ratio}; maxlm analytic {r['analytic_flops_per_device']:.3e}")
    coll = ", ".join(f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in r["collectives"].items())
    lines.append(f"collectives: {coll or 'none'}")
    lines.append(f"compile {r['compile_s']:.1f} s (+ {r['lower_s']:.1f} s to trace and lower)")
    return "\n".join(lines)
