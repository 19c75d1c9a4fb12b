"""Feed-forward blocks that plug into the decoder layer, looked up by `model.ffn`.

A block is a Linen module class built as `Block(cfg, lora=..., name=...)` and called on `x_BTD`, returning `y_BTD`. Blocks
that have auxiliary losses (the MoE router) `sow` them, already scaled by their coefficients, into the `aux`
collection; the train step sums them. Statistics that are only logged go to another collection (`moe`).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from maxlm.config import ModelConfig
from maxlm.model.layers import swiglu
from maxlm.model.lora import LoraSpec
from maxlm.model.moe import MoE


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(x W_gate) * (x W_up))."""

    cfg: ModelConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        c = self.cfg
        D, F = c.d_model, c.ffn_dim
        return swiglu(self, x_BTD, D, F, ("gate", "up", "down"))


# `moe` layers of a model are chosen by ModelConfig.layer_is_moe (first_dense_layers, moe_layer_interval); the
# other layers of an MoE model use `mlp`.
FFN_BLOCKS: dict[str, type[nn.Module]] = {"mlp": MLP, "moe": MoE}
