"""The human-readable plan: one aligned table, numbers with units, the reasoning in the row labels."""

from __future__ import annotations

from maxlm.plan.memory import USABLE_HBM_FRACTION
from maxlm.plan.planner import SECONDS_PER_DAY, Plan


def si(x: float, digits: int = 3) -> str:
    """2.78e9 -> '2.78B' (parameters, tokens)."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.{digits}g}{suffix}"
    return f"{x:.{digits}g}"


def gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB"


def duration(seconds: float) -> str:
    if seconds >= SECONDS_PER_DAY:
        return f"{seconds / SECONDS_PER_DAY:.2f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} hours"
    return f"{seconds / 60:.1f} minutes"


def render(plan: Plan) -> str:
    req, law, opt, shape = plan.request, plan.law, plan.optimum, plan.shape
    m, pc = shape.model, shape.count
    rows: list[tuple[str, str] | str] = []
    add = rows.append
    add(f"law: {law.name} ({law.source})")
    add(("compute (law units, 6ND)", f"{plan.compute:.3g} FLOPs"))
    if req.tokens_per_param:
        add("allocation: fixed --tokens-per-param (overrides the law)")
    else:
        add(f"compute-optimal allocation (closed form; numeric optimum agrees to "
            f"{abs(opt.n_numeric / opt.n - 1):.0e})")
    add(("N_opt", f"{si(opt.n)} parameters" + (" (non-vocabulary)" if law.params == "non_vocab" else "")))
    add(("D_opt", f"{si(opt.d)} tokens"))
    add(("tokens per parameter", f"{opt.tokens_per_param:.1f}"))
    add(("predicted loss at optimum", f"{opt.loss:.3f}"))
    add(("N_opt ~ C^a", f"a = {law.exponent():.3f}"))
    add("model (exact count by maxlm.flops)")
    add(("layers x d_model", f"{m.n_layers} x {m.d_model} (d_model / layers = {shape.aspect:.0f})"))
    add(("heads / kv heads / head_dim", f"{m.n_heads} / {m.n_kv_heads} / {m.head_dim}"))
    add(("ffn_dim", f"{m.ffn_dim}"))
    if shape.moe:
        add(("experts", f"{shape.moe.num_experts}, {shape.moe.experts_per_token} active per token"))
    add(("vocab", f"{m.vocab_size} ({'tied' if m.tie_embeddings else 'untied'} embeddings)"))
    params = f"{pc.total:,}"
    if shape.moe:
        params += f" total, {pc.active:,} active"
    add(("parameters", f"{params} ({shape.rel_error:+.1%} vs N_opt)"))
    add("training")
    add(("tokens", f"{si(plan.tokens)} ({plan.tokens / shape.law_params:.1f} per parameter)"))
    add(("global batch", f"{plan.rows} rows x {req.seq_len} = {si(plan.batch_tokens)} tokens "
                         f"(DeepSeek B_opt {si(plan.batch_tokens_opt)})"))
    add(("steps", f"{plan.steps:,} (warmup {plan.warmup_steps:,}, cosine to 10% of peak)"))
    add(("peak learning rate", f"{plan.lr:.3g} (DeepSeek lr_opt at C = M x D = {plan.deepseek_compute:.3g})"))
    add(("predicted final loss", f"{plan.predicted_loss:.3f}"))
    add(("FLOPs per token", f"{plan.flops_per_token:.3g} (6N = {6 * pc.active:.3g}; + attention, - embedding)"))
    add(("training FLOPs (counted)", f"{plan.training_flops:.3g}"))
    if plan.hardware:
        hw = plan.hardware
        add(f"hardware: {plan.chips} x {hw.name} ({hw.peak_flops / 1e12:g} TFLOP/s bf16, {hw.hbm_bytes / 1e9:g} GB)")
        add(("wall-clock", f"{duration(plan.seconds)} at {req.mfu:.0%} MFU"))
    if plan.mesh:
        e = plan.mesh.estimate
        add(f"memory per chip (remat {e.remat}; f32 params + AdamW, bf16 activations)")
        experts = f" expert={e.expert} ({shape.moe.num_experts // e.expert} experts per chip)" if shape.moe else ""
        add(("mesh", f"data={e.data} fsdp={e.fsdp} tensor={e.tensor}{experts}, grad_accum={e.grad_accum} "
                     f"({e.micro_rows} rows per chip per microbatch)"))
        add(("params / grads / Adam", f"{gb(e.params)} / {gb(e.grads)} / {gb(e.optimizer)}"))
        add(("layer workspace", gb(e.workspace)))
        add(("saved activations", gb(e.activations)))
        add(("logits / layer in flight", f"{gb(e.logits)} / {gb(e.working)} (the peak counts the larger of the "
                                         "logits and workspace + layer in flight)"))
        verdict = "fits" if plan.mesh.fits else "DOES NOT FIT"
        add(("total", f"{gb(e.total)} of {gb(plan.mesh.usable_bytes)} usable "
                      f"({USABLE_HBM_FRACTION:.0%} of {gb(plan.mesh.hbm_bytes)}): {verdict}"))
    width = max(len(r[0]) for r in rows if isinstance(r, tuple)) + 2
    lines = []
    for r in rows:
        lines.append(f"  {r[0]:<{width}}{r[1]}" if isinstance(r, tuple) else r)
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
