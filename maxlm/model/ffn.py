"""Feed-forward blocks that plug into the decoder layer, looked up by `model.ffn`.

A block is a Linen module class built as `Block(cfg, name=...)` and called on `x_BTD`, returning `y_BTD`. Blocks
that have auxiliary losses (the MoE router) `sow` them, already scaled by their coefficients, into the `aux`
collection; the train step sums them. Statistics that are only logged go to another collection (`moe`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxlm.config import ModelConfig
from maxlm.model.layers import compute_dtype, constrain, param
from maxlm.model.moe import MoE


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(x W_gate) * (x W_up))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        c = self.cfg
        dtype, pdt = compute_dtype(c), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(c.init_std)
        w_gate_DF = param(self, "gate", init, (c.d_model, c.ffn_dim), ("embed", "mlp"), pdt)
        w_up_DF = param(self, "up", init, (c.d_model, c.ffn_dim), ("embed", "mlp"), pdt)
        w_down_FD = param(self, "down", init, (c.ffn_dim, c.d_model), ("mlp", "embed"), pdt)
        gate_BTF = jnp.einsum("btd,df->btf", x_BTD, w_gate_DF.astype(dtype))
        up_BTF = jnp.einsum("btd,df->btf", x_BTD, w_up_DF.astype(dtype))
        h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("act_batch", "act_length", "act_mlp"))
        return jnp.einsum("btf,fd->btd", h_BTF, w_down_FD.astype(dtype))


# `moe` layers of a model are chosen by ModelConfig.layer_is_moe (first_dense_layers, moe_layer_interval); the
# other layers of an MoE model use `mlp`.
FFN_BLOCKS: dict[str, type[nn.Module]] = {"mlp": MLP, "moe": MoE}
