"""The model: a Llama-family decoder in Flax Linen with logically named parameter axes."""

from maxlm.model.transformer import Decoder, abstract_params, count_params_eval_shape

__all__ = ["Decoder", "abstract_params", "count_params_eval_shape"]
