"""`maxlm generate CONFIG [key=value ...] --prompt TEXT | --prompts-file FILE [sampling flags] [--json]`.

The sampling flags are written into the config's `generate.*` keys before validation, so a bad value is the same
one-line error (exit 2) as a bad YAML key. One `--prompt` without `--json` streams its completion to the terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from maxlm.config import Config, ConfigError, load_config, resolve_config_path
from maxlm.generate.engine import Completion, Engine, check_requests
from maxlm.generate.load import LoadedModel, load_model, load_tokenizer_for, stop_ids

FLAGS = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "min_p": float, "seed": int}


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    for name, tp in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=tp, default=None, help=f"generate.{name}")


def sampling_overrides(args: argparse.Namespace) -> list[str]:
    return [f"generate.{k}={getattr(args, k)}" for k in FLAGS if getattr(args, k) is not None]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxlm generate", description="Complete prompts with a KV-cached decoder.")
    p.add_argument("config", help="YAML path or preset name")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one text prompt (streamed to the terminal unless --json)")
    src.add_argument("--prompts-file", help="JSONL: {\"prompt\"} | {\"messages\"} | {\"prompt_ids\"} per line")
    add_sampling_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return p


def make_engine(loaded: LoadedModel, tokenizer: Any | None) -> Engine:
    """An engine for a loaded model; completions end at the tokenizer's (and the HF model's) stop ids."""
    cfg = loaded.cfg
    return Engine(cfg.model, loaded.params, loaded.mesh, loaded.rules, eos_ids=stop_ids(cfg, tokenizer),
                  max_length=cfg.generate.resolved_max_length(cfg.data.seq_len), batch_size=cfg.generate.batch_size,
                  decode_text=tokenizer.decode if tokenizer is not None else None)


def completion_json(c: Completion) -> dict:
    return {"completion": c.text, "completion_ids": c.completion_ids, "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}


class Streamer:
    """Prints a single completion as it grows: each call decodes all ids so far and prints the new suffix (a
    multi-byte character split over tokens appears once it is whole)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop, self.printed = tokenizer, stop, ""

    def __call__(self, index: int, ids: list[int]) -> None:
        text = self.tokenizer.decode(ids)
        for s in self.stop:  # never show a stop string, nor what follows it
            if s in text:
                text = text[:text.index(s)]
        if text.startswith(self.printed) and len(text) > len(self.printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg: Config = load_config(resolve_config_path(args.config), list(args.overrides) + sampling_overrides(args))
    from maxlm.generate.prompts import read_prompts_file, request_from_line

    tokenizer = load_tokenizer_for(cfg)
    if args.prompts_file:
        requests = read_prompts_file(args.prompts_file, cfg, tokenizer)
    else:
        if not args.prompt:
            raise ConfigError("--prompt is empty; give some text")
        requests = [request_from_line({"prompt": args.prompt}, cfg, tokenizer, "--prompt")]
    check_requests(requests, cfg.generate.resolved_max_length(cfg.data.seq_len), cfg.model.vocab_size)
    engine = make_engine(load_model(cfg), tokenizer)
    stream = len(requests) == 1 and not args.json and tokenizer is not None
    if stream:
        sys.stdout.write(args.prompt if args.prompt else "")
        streamer = Streamer(tokenizer, requests[0].stop)
        (done,) = engine.generate(requests, on_tokens=streamer)
        sys.stdout.write((done.text or "")[len(streamer.printed):] + "\n")
        return 0
    for c in engine.generate(requests):
        if args.json:
            print(json.dumps(completion_json(c)))
        else:
            print(c.text if c.text is not None else " ".join(map(str, c.completion_ids)))
            print("-" * 40)
    return 0
