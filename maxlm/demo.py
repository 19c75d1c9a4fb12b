"""The `make run` job: a real corpus with no download.

Trains a BPE tokenizer on this interpreter's standard library source, pretrains the `demo` model on it over an
8-device CPU mesh, prints the first and last loss, greedily continues a Python prompt, then fine-tunes the model on
instruction pairs derived from the same library (maxlm.demo_sft) and answers a held-out instruction.
"""

from __future__ import annotations

import json
import os
import sysconfig

from maxlm.config import Config, load_config, resolve_config_path

PROMPT = "def fibonacci("
DPO_PAIRS = 2000


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
        print(f"[1/5] training a {cfg.model.vocab_size}-token BPE tokenizer on {cfg.data.path}")
        train_tokenizer(cfg.data.path, cfg.model.vocab_size, tok_path)
    else:
        print(f"[1/5] reusing tokenizer {tok_path}")
    cfg = load_config(resolve_config_path("stdlib_demo"), ["data.path=" + stdlib_glob(), f"data.tokenizer={tok_path}",
                                                             f"run_dir={cfg.run_dir}"] + overrides)
    print(f"[2/5] pretraining the demo model for {cfg.train.steps} steps (run_dir={cfg.run_dir})")
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
    print("[3/5] greedy continuation (KV-cached decoding, maxlm.generate):")
    print(PROMPT + out.text)
    from maxlm.demo_sft import run_sft_stage

    code = run_sft_stage(cfg, tok_path, overrides, progress)
    return code or run_dpo_stage(cfg, tok_path, summary["checkpoint_dir"], overrides, progress)


def run_dpo_stage(pre: Config, tok_path: str, checkpoint: str, overrides: list[str], progress: bool) -> int:
    """DPO on stdlib pairs (chosen: real code; rejected: the same lines corrupted) from the pretrained model."""
    from maxlm.demo_pairs import write_stdlib_pairs
    from maxlm.train.loop import train

    pairs = os.path.join(pre.run_dir, "preference", "stdlib_pairs.jsonl")
    # Pretraining's data and batch keys do not fit pairs; its model keys and `train.steps` (a quick run) do.
    dpo_overrides = [k for k in overrides if not k.startswith(("train.", "data.", "run_dir")) or
                     k.startswith("train.steps=")]
    # No more pairs than the run reads: a short run (train.steps=4) need not tokenize and reference-score 2000.
    shape = load_config(resolve_config_path("stdlib_dpo"), [f"data.path={stdlib_glob()}", f"data.tokenizer={tok_path}"]
                        + dpo_overrides)
    n = write_stdlib_pairs(stdlib_glob(), pairs, min(DPO_PAIRS, shape.train.steps * shape.train.global_batch_size
                                                     * max(shape.data.pairs_per_row, 1)))
    cfg = load_config(resolve_config_path("stdlib_dpo"), [f"data.path={pairs}", f"data.tokenizer={tok_path}",
                                                            f"load_parameters_from={checkpoint}",
                                                            f"run_dir={os.path.join(pre.run_dir, 'dpo')}"]
                      + dpo_overrides)
    print(f"[5/5] DPO ({cfg.dpo.loss_type}, beta {cfg.dpo.beta}, reference {cfg.dpo.reference}) on {n} stdlib pairs "
          f"for {cfg.train.steps} steps (run_dir={cfg.run_dir})")
    summary = train(cfg, progress=progress)
    rows = [r for r in _metrics(cfg.run_dir) if "rewards/accuracies" in r]
    if rows:
        first, last = rows[0], rows[-1]
        for key in ("loss", "rewards/accuracies", "rewards/margins"):
            print(f"  {key}: step {first['step']} {first[key]:.4f} -> step {last['step']} {last[key]:.4f}")
    return 0 if summary["steps"] == cfg.train.steps else 1


def _metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
