"""The `make run` job: a real corpus with no download.

Trains a BPE tokenizer on this interpreter's standard library source, pretrains the `demo` model on it over an
8-device CPU mesh, prints the first and last loss, greedily continues a Python prompt, then fine-tunes the model on
instruction pairs derived from the same library (maxlm.demo_sft) and answers a held-out instruction.
"""

from __future__ import annotations

import os
import sysconfig

from maxlm.config import load_config, resolve_config_path

PROMPT = "def fibonacci("


def stdlib_glob() -> str:
    """This interpreter's standard library source, without the third-party packages installed beside it."""
    return os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py") + ",!*/site-packages/*,!*/dist-packages/*"


def run_demo(overrides: list[str], progress: bool = True) -> int:
    from maxlm.data.tokenizer import load_tokenizer, train_tokenizer
    from maxlm.generate import Engine, Request
    from maxlm.train.loop import train

    cfg = load_config(resolve_config_path("stdlib_demo"), ["data.path=" + stdlib_glob(), "data.tokenizer=",
                                                             "data.source=synthetic"] + overrides)
    tok_path = os.path.join(cfg.run_dir, "tokenizer.model")
    if not os.path.isfile(tok_path):
        print(f"[1/4] training a {cfg.model.vocab_size}-token BPE tokenizer on {cfg.data.path}")
        train_tokenizer(cfg.data.path, cfg.model.vocab_size, tok_path)
    else:
        print(f"[1/4] reusing tokenizer {tok_path}")
    cfg = load_config(resolve_config_path("stdlib_demo"), ["data.path=" + stdlib_glob(), f"data.tokenizer={tok_path}",
                                                             f"run_dir={cfg.run_dir}"] + overrides)
    print(f"[2/4] pretraining the demo model for {cfg.train.steps} steps (run_dir={cfg.run_dir})")
    summary = train(cfg, progress=progress)
    print(f"first loss {summary['first_loss']:.4f} -> last loss {summary['last_loss']:.4f}")
    run = summary["run"]
    tok = load_tokenizer(tok_path)
    ids = tok.encode(PROMPT)
    if cfg.data.add_bos:
        ids = [tok.bos_id] + ids
    engine = Engine(cfg.model, run.state.params, run.mesh, run.rules, eos_ids=[tok.eos_id],
                    max_length=cfg.data.seq_len, decode_text=tok.decode)
    (out,) = engine.generate([Request(ids, 48)])
    print("[3/4] greedy continuation (KV-cached decoding, maxlm.generate):")
    print(PROMPT + out.text)
    from maxlm.demo_sft import run_sft_stage

    return run_sft_stage(cfg, tok_path, overrides, progress)
