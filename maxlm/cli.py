"""The `maxlm` command. Subcommands parse, load the config, call into the package and print; nothing else.

User mistakes surface as ConfigError: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from maxlm import apply_fake_cpu_mesh_flags
from maxlm.config import ConfigError, config_to_yaml, load_config, resolve_config_path
from maxlm.quiet import quiet_libraries


def _force_cpu_devices(n: int) -> None:
    """Fake CPU devices (for the 8-device CPU mesh) must be requested before jax initialises its backend."""
    if n > 0 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    apply_fake_cpu_mesh_flags()


def _load(args: argparse.Namespace):
    cfg = load_config(resolve_config_path(args.config), args.overrides)
    if cfg.model.from_hf:  # the model section from a Hugging Face config.json
        from maxlm.convert.families import resolve_model_from_hf

        cfg = resolve_model_from_hf(cfg, args.overrides)
    return cfg


def cmd_config(args: argparse.Namespace) -> int:
    print(config_to_yaml(_load(args)), end="")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    cfg = _load(args)
    import jax

    from maxlm.inspect_params import format_table, inspect_config

    report = inspect_config(cfg, args.devices or jax.device_count())
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0


def _multiprocess_guard(fn: Callable[[], int]) -> int:
    """Runs `fn` after joining a multi-process run (maxlm.distributed); an unexpected error there first gives the
    peer watchdog time to name a dead peer in one line (a failed collective is usually that)."""
    from maxlm import distributed

    distributed.initialize()
    try:
        return fn()
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception:
        distributed.await_peer_verdict()
        raise
    finally:
        distributed.finish()


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)

    def run() -> int:
        from maxlm.train.loop import TrainingError, describe, train

        try:
            summary = train(cfg, progress=not args.no_progress)
        except TrainingError as e:  # non-finite steps, no readable checkpoint, full disk: one line, exit 1
            print(f"maxlm: error: {e}", file=sys.stderr)
            return 1
        print(describe(summary))
        return 0

    return _multiprocess_guard(run)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0 (got --steps {args.steps} --warmup "
                          f"{args.warmup}): the number of timed and untimed train steps")
    cfg = _load(args)

    def run() -> int:
        from maxlm.bench import bench

        result = bench(cfg, args.steps, warmup=args.warmup)
        if args.json:
            print(json.dumps(result))
        else:
            for k, v in result.items():
                print(f"{k:>22}: {v}")
        return 0

    return _multiprocess_guard(run)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from maxlm.data.tokenizer import train_tokenizer

    path = train_tokenizer(args.input, args.vocab_size, args.out)
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from maxlm.demo import run_demo

    return run_demo(args.overrides, progress=not args.no_progress)


def _delegate(module: str, function: str = "main") -> Callable[[list[str]], int]:
    """Subcommand families with their own argument parsers (`maxlm plan`, `maxlm convert`, `maxlm data`)."""

    def run(argv: list[str]) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(argv)

    return run


DELEGATED: dict[str, Callable[[list[str]], int]] = {
    "plan": _delegate("maxlm.compile.verify", "plan_main"),  # plan, with --verify compiling the plan
    "convert": _delegate("maxlm.convert.cli"),
    "lora": _delegate("maxlm.convert.lora_cli"),
    "data": _delegate("maxlm.data.cli"),
    "bench-data": _delegate("maxlm.data.cli", "bench_main"),
    "launch": _delegate("maxlm.launch.cli"),
    "compile": _delegate("maxlm.compile.cli"),
    "generate": _delegate("maxlm.generate.cli"),
    "eval": _delegate("maxlm.eval.cli"),
    "bench-generate": _delegate("maxlm.generate.bench"),
    "reward": _delegate("maxlm.reward_cli"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxlm", description="Train LLMs end to end in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("config", help="YAML path or preset name (e.g. tiny, demo, llama3-8b)")
        sp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
        sp.set_defaults(fn=fn)
        return sp

    with_config("config", cmd_config, "print the resolved config")
    sp = with_config("inspect", cmd_inspect, "parameter shapes, logical axes, shardings and bytes per device")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--devices", type=int, default=0, help="device count to plan for (default: the visible ones)")
    sp = with_config("train", cmd_train, "train a model (resumes from run_dir when it holds checkpoints)")
    sp.add_argument("--no-progress", action="store_true")
    sp = with_config("bench", cmd_bench, "time the train step: tokens/s, TFLOP/s, MFU, peak memory")
    sp.add_argument("--steps", type=int, default=10)
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--json", action="store_true")

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tok_command", required=True)
    tt = tok.add_parser("train", help="train a sentencepiece BPE tokenizer")
    tt.add_argument("--input", required=True, help="glob(s) of text files, comma-separated")
    tt.add_argument("--vocab-size", type=int, required=True)
    tt.add_argument("--out", required=True, help="output .model path")
    tt.set_defaults(fn=cmd_tokenizer)

    demo = sub.add_parser("demo", help="the `make run` job: tokenizer + pretraining on the Python stdlib, a "
                                       "greedy continuation, then SFT on stdlib instruction pairs")
    demo.add_argument("overrides", nargs="*")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(fn=cmd_demo)
    sub.add_parser("plan", help="scaling planner: compute budget -> config (see `maxlm plan --help`)", add_help=False)
    sub.add_parser("convert", help="Hugging Face <-> maxlm checkpoints (see `maxlm convert --help`)", add_help=False)
    sub.add_parser("lora", help="LoRA adapters: merge into the base, export to PEFT (see `maxlm lora --help`)",
                   add_help=False)
    sub.add_parser("data", help="data preparation (see `maxlm data --help`)", add_help=False)
    sub.add_parser("compile", help="compile the train step for a TPU slice / GPU cluster from this machine: "
                   "memory per device, fits, FLOPs, collectives (see `maxlm compile --help`)", add_help=False)
    sub.add_parser("launch", help="several processes on this machine: `maxlm launch local --processes N "
                   "--devices-per-process M CONFIG`", add_help=False)
    sub.add_parser("bench-data", help="input-pipeline throughput (see `maxlm bench-data --help`)", add_help=False)
    sub.add_parser("generate", help="complete prompts with a KV cache (see `maxlm generate --help`)", add_help=False)
    sub.add_parser("bench-generate", help="prefill/decode throughput, beside transformers (see `maxlm "
                                          "bench-generate --help`)", add_help=False)
    sub.add_parser("eval", help="loss / multiple-choice / win-rate evaluation (see `maxlm eval --help`)",
                   add_help=False)
    sub.add_parser("reward", help="reward-model tools: `maxlm reward score CKPT --input rows.jsonl`", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    _force_cpu_devices(int(os.environ.get("MAXLM_CPU_DEVICES", "8")))
    try:
        if argv and argv[0] in DELEGATED:
            return DELEGATED[argv[0]](argv[1:])
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        bad = [a for a in extra if "=" not in a or a.startswith("-")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        if extra:  # key=value overrides given after an option flag
            args.overrides = list(getattr(args, "overrides", [])) + extra
        return args.fn(args)
    except ConfigError as e:
        print(f"maxlm: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `maxlm ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
