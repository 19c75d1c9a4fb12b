"""Data: the sentencepiece tokenizer and the grain pretraining pipeline (see pipeline.py for the stage order)."""

from maxlm.data.pipeline import BATCH_KEYS, build_dataset, pack_stats
from maxlm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["BATCH_KEYS", "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "Tokenizer", "build_dataset", "load_tokenizer",
           "pack_stats", "train_tokenizer"]
