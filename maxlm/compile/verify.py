"""`maxlm plan ... --verify`: the planned config compiled for the planned hardware, XLA's peak memory per device
beside the planner's estimate for exactly what was compiled (maxlm.plan.memory.estimate_for_config)."""

from __future__ import annotations

from typing import Any

from maxlm.config import ConfigError


def verify_plan(plan: Any, run_dir: str | None) -> dict[str, Any]:
    """The `verify` object of `maxlm plan --json`."""
    from maxlm.compile.cli import compile_for_target
    from maxlm.compile.program import for_target
    from maxlm.compile.targets import parse_target, target_for
    from maxlm.plan.cli import VERIFY_TOLERANCE
    from maxlm.plan.memory import estimate_for_config
    from maxlm.plan.planner import plan_to_config

    if plan.hardware is None or not plan.request.chips:
        raise ConfigError("--verify needs --hardware NAME and --chips K (the hardware to compile for)")
    cfg = plan_to_config(plan, run_dir or "runs/verify")
    target = target_for(plan.hardware.name, plan.request.chips)
    report = compile_for_target(cfg, target)
    peak = report["peak_bytes_per_device"]
    est = estimate_for_config(for_target(cfg, parse_target(target)), report["mesh"], report["platform"]).total
    ratio = est / peak
    return {"target": report["target"], "mesh": report["mesh"], "xla_peak_bytes_per_device": peak,
            "estimate_bytes_per_device": est, "ratio": ratio, "within_tolerance": abs(ratio - 1) <= VERIFY_TOLERANCE,
            "fits": report["fits"], "hbm_bytes_per_device": report["hbm_bytes_per_device"],
            "compile_s": report["compile_s"]}


def plan_main(argv: list[str]) -> int:
    """`maxlm plan ...` with `--verify` available."""
    from maxlm.plan.cli import main

    return main(argv, verify_plan)
