"""`maxlm eval CONFIG [key=value ...] --task loss|choice|winrate [--task-file FILE] [--json]`.

  loss     loss, perplexity and bits per byte over `train.eval_steps` batches of the dataset `data.*` describes
           (its held-out split when data.eval_fraction > 0, else all of it); `--task-file` sets data.path.
  choice   multiple-choice JSONL (context, choices, gold) with lm-evaluation-harness semantics: acc, acc_norm.
  winrate  the config's model (A) against `--model-b` on a prompts file, judged by the reward model `--judge`.

Results print as a table (or one JSON object with --json) and are written to run_dir/eval.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Any

from maxlm.config import Config, ConfigError, load_config, resolve_config_path
from maxlm.generate.cli import add_sampling_flags, make_engine, sampling_overrides
from maxlm.generate.load import load_model, load_tokenizer_for

TASKS = ("loss", "choice", "winrate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxlm eval", description="Evaluate a model: loss, multiple choice, win rate.")
    p.add_argument("config", help="YAML path or preset name")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--task-file", default="", help="loss: data.path; choice: JSONL rows; winrate: a prompts file")
    p.add_argument("--model-b", default="", help="winrate: model B, a YAML config (its weights per its keys) or "
                                                 "a run/checkpoint/HF directory of the config's architecture")
    p.add_argument("--judge", default="", help="winrate: a maxlm reward-model checkpoint (model.head=scalar)")
    p.add_argument("--tie-margin", type=float, default=0.0, help="winrate: score differences this small are ties")
    add_sampling_flags(p)
    p.add_argument("--json", action="store_true")
    return p


def eval_loss(cfg: Config) -> dict[str, Any]:
    from maxlm.model import Decoder
    from maxlm.train.evaluate import make_evaluator

    loaded = load_model(cfg)
    split = "eval" if cfg.data.eval_fraction > 0 else "train"
    scored = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=1))
    evaluate = make_evaluator(scored, loaded.mesh, loaded.rules, Decoder(cfg.model), split=split)
    out = evaluate(loaded.params)
    return {"loss": out["loss"], "perplexity": math.exp(out["loss"]), "bits_per_byte": out.get("bits_per_byte"),
            "tokens": out["tokens"], "split": split, "batches": cfg.train.eval_steps}


def eval_choice(cfg: Config, task_file: str) -> dict[str, Any]:
    from maxlm.eval.choice import read_choice_file, run_choice
    from maxlm.eval.scoring import Scorer

    read_choice_file(task_file)  # a malformed row fails before the model loads
    tokenizer = load_tokenizer_for(cfg)
    if tokenizer is None:
        raise ConfigError("--task choice needs a tokenizer; set data.tokenizer")
    scorer = Scorer(load_model(cfg), cfg.generate.batch_size, cfg.generate.resolved_max_length(cfg.data.seq_len))
    return run_choice(task_file, scorer, tokenizer, cfg.data.add_bos)


def model_b_config(cfg: Config, spec: str) -> Config:
    """`--model-b`: a YAML file is a config of its own; anything else is weights for this config's architecture."""
    if spec.endswith((".yml", ".yaml")) or (not os.path.exists(spec) and "/" not in spec):
        b = load_config(resolve_config_path(spec), [])
        return dataclasses.replace(b, generate=cfg.generate, mesh=cfg.mesh)
    if not os.path.exists(spec):
        raise ConfigError(f"--model-b {spec} does not exist")
    return dataclasses.replace(cfg, load_parameters_from=spec)


def eval_winrate(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    from maxlm.eval.winrate import load_judge, win_rate
    from maxlm.generate.engine import check_requests
    from maxlm.generate.prompts import read_prompts_file

    if not args.model_b or not args.judge:
        raise ConfigError("--task winrate needs --model-b (the model to compare with) and --judge (a reward model)")
    cfg_b = model_b_config(cfg, args.model_b)
    tokenizer = load_tokenizer_for(cfg)
    requests = read_prompts_file(args.task_file, cfg, tokenizer)
    check_requests(requests, cfg.generate.resolved_max_length(cfg.data.seq_len), cfg.model.vocab_size)
    answers = []
    for c in (cfg, cfg_b):
        loaded = load_model(c)
        answers.append(make_engine(loaded, tokenizer).generate(requests))
        del loaded
    judge = load_judge(args.judge, cfg.generate.batch_size)
    eos = tokenizer.eos_id if tokenizer is not None else None
    return win_rate(requests, answers[0], answers[1], judge, eos, args.tie_margin) | {
        "model_a": cfg.load_parameters_from or cfg.run_dir, "model_b": args.model_b, "judge": args.judge}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + sampling_overrides(args)
    if args.task == "loss" and args.task_file:
        overrides.append(f"data.path={args.task_file}")
    if args.task in ("choice", "winrate") and not args.task_file:
        raise ConfigError(f"--task {args.task} needs --task-file FILE")
    cfg = load_config(resolve_config_path(args.config), overrides)
    if args.task == "loss":
        results = eval_loss(cfg)
    elif args.task == "choice":
        results = eval_choice(cfg, args.task_file)
    else:
        results = eval_winrate(cfg, args)
    report = {"task": args.task, "task_file": args.task_file, "results": results}
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "eval.json"), "w") as f:
        json.dump(report, f, indent=1)
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in results.items():
            if not isinstance(v, list) or len(v) <= 2:
                print(f"{k:>16}: {v}")
    return 0
