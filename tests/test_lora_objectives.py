"""LoRA with the other objectives: the LoRA wrapper is objective-agnostic (the loss sees the base and adapters
joined), so an SFT run with adapters starts at exactly the base model's SFT loss (= the transformers reference)
and trains only the adapters."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from test_sft_train import first_step, hf_model, reference_loss, sft_config  # noqa: E402,F401


def test_lora_sft_starts_at_the_base_loss_and_trains_adapters(hf_model) -> None:
    hf_dir, model, data = hf_model
    full_loss, batch, _ = first_step(sft_config(hf_dir, data, "data.packing=best_fit"))
    lora_loss, lora_batch, metrics = first_step(sft_config(hf_dir, data, "data.packing=best_fit", "lora.enabled=true",
                                                           "lora.rank=4", "lora.dropout=0.1"))
    for k in batch:
        np.testing.assert_array_equal(lora_batch[k], batch[k])
    np.testing.assert_allclose(lora_loss, full_loss, rtol=1e-6)
    np.testing.assert_allclose(lora_loss, reference_loss(hf_dir, model, batch), rtol=1e-5)
    assert metrics["grad_norm"] > 0 and np.isfinite(metrics["grad_norm"])
