"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): y = x W + s * dropout(x) A B.

Every dense projection goes through `maxlm.model.layers.project`; when the module carries a `LoraSpec` that
selects the projection, `project` calls `adapter_delta` here, which declares two parameters next to the base weight
`{name}`: `{name}_lora_a` [in dims..., r] and `{name}_lora_b` [r, out dims...]. The input dims of a weight are the
ones its einsum contracts with the activation (q [D, N, H]: D in, (N, H) out; o [N, H, D]: (N, H) in, D out), so
A carries the base's input axes with their logical names and B its output axes: each adapter is sharded like the
part of the base weight it touches, whatever the rules table says. Inside a scanned stack both get the leading
`layers` axis like every other weight.

Initialisation follows PEFT (peft/tuners/lora/layer.py, `reset_lora_parameters`): A as torch's default Linear init,
`kaiming_uniform_(a=sqrt(5))` on the [r, in] weight, i.e. U(-1/sqrt(in), 1/sqrt(in)) with in = the product of the
input dims; B zeros, so the adapted model starts exactly at the base. The scale is alpha / r, or alpha / sqrt(r)
with rsLoRA (Kalajdzievski 2023). Dropout, as in PEFT, applies to the adapter's input only, and only when the
caller passes a `lora_dropout` rng (training).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxlm.config import LORA_TARGET_NAMES, Config
from maxlm.config.lora_checks import target_kind

# The names `project` is called with (attention, dense MLP, MoE shared experts), then the routed experts' weights
# as targets name them (`layers/moe/gate` is selected as `layers/moe/expert_gate`); equal to the schema's list.
PROJECTION_NAMES = ("q", "k", "v", "o", "gate", "up", "down", "shared_gate", "shared_up", "shared_down",
                    "expert_gate", "expert_up", "expert_down")
assert PROJECTION_NAMES == LORA_TARGET_NAMES
EXPERT_MODULE, EXPERT_WEIGHTS = "moe", ("gate", "up", "down")  # maxlm.model.moe.MoE's name and its [E, ...] weights
A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
DROPOUT_RNG = "lora_dropout"


@dataclass(frozen=True)
class LoraSpec:
    """What the model needs to know about the adapters (hashable: it is a Linen module attribute)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def matches(self, target: str, path: str) -> bool:
        """Whether one target selects the weight at `path` (`layers/attn/q`): a name matches the last element, a
        pattern is searched anywhere in the path (routed experts' weights as `.../moe/expert_gate`)."""
        path = selection_path(path)
        if target_kind(target) == "name":
            return path.rsplit("/", 1)[-1] == target
        return re.search(target, path) is not None

    def selects(self, path: str) -> bool:
        return any(self.matches(t, path) for t in self.targets)


def selection_path(path: str) -> str:
    """The path targets are matched against: the weight's own, except a routed expert weight `.../moe/gate` is
    `.../moe/expert_gate` (so `gate` keeps meaning the dense MLP's projection)."""
    parts = path.split("/")
    if len(parts) >= 2 and parts[-2] == EXPERT_MODULE and parts[-1] in EXPERT_WEIGHTS:
        return "/".join(parts[:-1] + ["expert_" + parts[-1]])
    return path


def adapts(module: nn.Module, name: str) -> bool:
    """Whether the module's weight `name` carries an adapter here: the spec selects it, and the parameter tree has
    the adapter (applied to a tree without adapters, e.g. the frozen base as a DPO reference, the model is the
    base)."""
    spec = getattr(module, "lora", None)
    return spec is not None and spec.selects("/".join(module.path + (name,))) and (
        module.is_initializing() or module.has_variable("params", name + A_SUFFIX))


def lora_spec(cfg: Config) -> LoraSpec | None:
    """The run's adapters, or None when `lora.enabled` is false."""
    lo = cfg.lora
    if not lo.enabled:
        return None
    return LoraSpec(rank=lo.rank, alpha=float(lo.alpha), targets=tuple(lo.targets), dropout=float(lo.dropout),
                    rslora=bool(lo.rslora))


def is_adapter_name(name: str) -> bool:
    return name.endswith(A_SUFFIX) or name.endswith(B_SUFFIX)


def base_name(name: str) -> str:
    """`q_lora_a` -> `q`."""
    for suffix in (A_SUFFIX, B_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def split_adapters(tree: dict) -> tuple[dict, dict]:
    """A model parameter tree (boxed or not) -> (adapters, base), both nested like the original."""
    adapters, base = {}, {}
    for k, v in tree.items():
        if isinstance(v, dict):
            a, b = split_adapters(v)
            if a:
                adapters[k] = a
            if b:
                base[k] = b
        elif is_adapter_name(k):
            adapters[k] = v
        else:
            base[k] = v
    return adapters, base


def join(base: dict, adapters: dict) -> dict:
    """The inverse of `split_adapters`: the adapters put back next to their base weights."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = join(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def split_einsum(eq: str) -> tuple[str, str, str]:
    """'btd,dnh->btnh' -> ('btd', 'dnh', 'btnh')."""
    inputs, out = eq.replace(" ", "").split("->")
    x_sub, w_sub = inputs.split(",")
    return x_sub, w_sub, out


def weight_io(eq: str, ndim: int) -> int:
    """How many leading dims of the weight are inputs (contracted with the activation). Every projection's weight
    is laid out inputs first, then outputs; anything else is a bug in the caller."""
    x_sub, w_sub, _ = split_einsum(eq)
    assert len(w_sub) == ndim, (eq, ndim)
    n_in = sum(1 for ch in w_sub if ch in x_sub)
    assert all(ch in x_sub for ch in w_sub[:n_in]) and not any(ch in x_sub for ch in w_sub[n_in:]), eq
    return n_in


def a_init(fan_in: int) -> nn.initializers.Initializer:
    """PEFT's A init: kaiming_uniform(a=sqrt(5)) on [r, in] = U(-b, b) with b = gain * sqrt(3 / fan_in), gain =
    sqrt(2 / (1 + a^2)) = sqrt(1/3), so b = 1 / sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def adapter_delta(module: nn.Module, name: str, x: jax.Array, eq: str, shape: tuple[int, ...],
                  names: tuple[str | None, ...], spec: LoraSpec, dtype: jnp.dtype) -> jax.Array:
    """s * (dropout(x) A) B, with the same output layout as `einsum(eq, x, W)`."""
    c = module.cfg
    n_in = weight_io(eq, len(shape))
    in_shape, out_shape = shape[:n_in], shape[n_in:]
    in_names, out_names = names[:n_in], names[n_in:]
    pdt = jnp.dtype(c.param_dtype)
    a = module.param(name + A_SUFFIX, nn.with_logical_partitioning(a_init(math.prod(in_shape)), in_names + (None,)),
                     in_shape + (spec.rank,), pdt)
    b = module.param(name + B_SUFFIX, nn.with_logical_partitioning(nn.initializers.zeros, (None,) + out_names),
                     (spec.rank,) + out_shape, pdt)
    if spec.dropout > 0 and module.has_rng(DROPOUT_RNG):
        keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - spec.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
    x_sub, w_sub, out_sub = split_einsum(eq)
    r = next(ch for ch in "rzyxwqponmlkjihgfedcba" if ch not in eq)
    mid = "".join(ch for ch in x_sub if ch not in w_sub) + r
    xa = jnp.einsum(f"{x_sub},{w_sub[:n_in]}{r}->{mid}", x, a.astype(dtype))
    return spec.scale * jnp.einsum(f"{mid},{r}{w_sub[n_in:]}->{out_sub}", xa, b.astype(dtype))


def adapter_product(a: jax.Array, b: jax.Array, w_ndim: int) -> jax.Array:
    """A B for one adapted weight or a batch of them: W [batch..., in..., out...], A [batch..., in..., r],
    B [batch..., r, out...], where the batch dims (layers of a scanned stack, experts, or both) lead all three."""
    n_batch = a.ndim + b.ndim - 2 - w_ndim
    n_in = a.ndim - 1 - n_batch
    letters = "abcdefghijklmnopqstuvwxyz"
    lead, ins = "ABCDEFGH"[:n_batch], letters[:n_in]
    outs = letters[n_in:n_in + b.ndim - 1 - n_batch]
    return jnp.einsum(f"{lead}{ins}R,{lead}R{outs}->{lead}{ins}{outs}", a, b)


def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale * A B (shapes as in `adapter_product`), computed in float32 and returned in W's dtype."""
    delta = adapter_product(a.astype(jnp.float32), b.astype(jnp.float32), w.ndim)
    assert delta.shape == w.shape, (delta.shape, w.shape)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def adapted_experts(module: nn.Module, name: str, w_EIO: jax.Array, names: tuple[str | None, ...],
                    spec: LoraSpec, dtype: jnp.dtype) -> jax.Array:
    """A routed expert weight W [E, in, out] with per-expert adapters A [E, in, r], B [E, r, out] folded in:
    W + s * A_e B_e, exact, so every grouped-matmul implementation (ragged_dot, tiled, blocked, capacity,
    expert-parallel exchange) runs unchanged and the gradient reaches A and B through the sum. As with PEFT's
    adapters on parameters (`target_parameters`), no dropout applies: there is no per-token adapter input."""
    E, I, O = w_EIO.shape
    pdt = jnp.dtype(module.cfg.param_dtype)
    a = module.param(name + A_SUFFIX, nn.with_logical_partitioning(a_init(I), (names[0], names[1], None)),
                     (E, I, spec.rank), pdt)
    b = module.param(name + B_SUFFIX, nn.with_logical_partitioning(nn.initializers.zeros, (names[0], None, names[2])),
                     (E, spec.rank, O), pdt)
    delta = jnp.einsum("eir,ero->eio", a.astype(dtype), b.astype(dtype))
    return w_EIO.astype(dtype) + (spec.scale * delta).astype(dtype)


def merge_adapters(params: Any, scale: float) -> Any:
    """A params tree with adapters next to their base weights -> the plain model's tree, each adapted weight
    replaced by W + scale * A B (the adapted model's function with no adapter left: `maxlm lora merge`)."""
    if not isinstance(params, dict):
        return params
    out = {}
    for k, v in params.items():
        if is_adapter_name(k):
            continue
        if isinstance(v, dict):
            out[k] = merge_adapters(v, scale)
        elif k + A_SUFFIX in params:
            out[k] = merged_weight(v, params[k + A_SUFFIX], params[k + B_SUFFIX], scale)
        else:
            out[k] = v
    return out
