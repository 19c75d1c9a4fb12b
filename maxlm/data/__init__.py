"""Data: the sentencepiece tokenizer and the grain pretraining pipeline (see pipeline.py for the stage order).

Names are resolved lazily (PEP 562): importing one light module of the package never imports grain and
sentencepiece. The `data` section's schema and checks live in `maxlm.config.data_spec`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BATCH_KEYS": "maxlm.data.pipeline",
    "build_dataset": "maxlm.data.pipeline",
    "build_eval_batches": "maxlm.data.pipeline",
    "pack_stats": "maxlm.data.pipeline",
    "BOS_ID": "maxlm.data.tokenizer",
    "EOS_ID": "maxlm.data.tokenizer",
    "PAD_ID": "maxlm.data.tokenizer",
    "UNK_ID": "maxlm.data.tokenizer",
    "Tokenizer": "maxlm.data.tokenizer",
    "load_tokenizer": "maxlm.data.tokenizer",
    "train_tokenizer": "maxlm.data.tokenizer",
    "prepare_cache": "maxlm.data.prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'maxlm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
