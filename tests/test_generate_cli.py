"""`maxlm generate` end to end: weights from a run directory, a JSONL prompts file with text, chat messages and ids,
--json fields, streaming of a single prompt, and the bad inputs that must be one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from helpers import tiny_config
from maxlm.cli import main
from maxlm.data.chat_template import resolve_chat_template
from maxlm.data.tokenizer import load_tokenizer, train_tokenizer
from maxlm.generate import Engine, Request
from maxlm.mesh import build_mesh, logical_rules
from maxlm.model import Decoder
from maxlm.train.checkpoint import Checkpointer
from maxlm.train.optimizer import make_optimizer
from maxlm.train.state import init_state, state_layout

VOCAB = 320
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 1\n" * 40


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tokenizer and a run directory holding a checkpoint of random weights (seed 3, not the config's 0)."""
    root = tmp_path_factory.mktemp("gen")
    (root / "corpus.txt").write_text(TEXT)
    tok_path = train_tokenizer(str(root / "corpus.txt"), VOCAB, str(root / "tok.model"))
    overrides = [f"run_dir={root}/run", f"model.vocab_size={VOCAB}", f"data.tokenizer={tok_path}",
                 "generate.max_length=48"]
    cfg = tiny_config(*overrides)
    mesh, rules = build_mesh(cfg), logical_rules(cfg)
    model = Decoder(cfg.model)
    tx, _ = make_optimizer(cfg)
    state = init_state(cfg, model, tx, state_layout(cfg, model, tx, mesh, rules), mesh, rules, jax.random.key(3))
    with Checkpointer(cfg, mesh) as ckpt:
        ckpt.save(1, state, jax.random.key(0), None)
    return root, overrides, cfg, mesh, rules, state.params, load_tokenizer(tok_path)


def _one_line_exit_2(capsys, argv: list[str], expect: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and expect in err, err


def test_prompts_file_json_and_streaming(run, capsys) -> None:
    root, overrides, cfg, mesh, rules, params, tok = run
    messages = [{"role": "user", "content": "add two numbers"}]
    lines = [{"prompt": "def add("}, {"messages": messages}, {"prompt_ids": [2, 40, 41, 42], "max_new_tokens": 3}]
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert main(["generate", "tiny", *overrides, f"load_parameters_from={root}/run", "--prompts-file",
                 str(root / "prompts.jsonl"), "--json", "--max-new-tokens", "6"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [set(r) for r in rows] == [{"completion", "completion_ids", "finish_reason", "prompt_tokens",
                                       "completion_tokens"}] * 3

    # The same requests straight through the engine with the checkpoint's parameters.
    chat = tok.encode_with_offsets(resolve_chat_template("auto", tok).render(messages, add_generation_prompt=True))[0]
    reqs = [Request([tok.bos_id] + tok.encode("def add("), 6), Request(chat, 6), Request([2, 40, 41, 42], 3)]
    engine = Engine(cfg.model, params, mesh, rules, eos_ids=[tok.eos_id, tok.token_id("<|im_end|>")], max_length=48,
                    decode_text=tok.decode)
    for r, want, row in zip(reqs, engine.generate(reqs), rows):
        assert row["prompt_tokens"] == len(r.prompt_ids)
        assert row["completion_ids"] == want.completion_ids and row["completion"] == want.text
        assert row["completion_tokens"] == len(want.completion_ids) and row["finish_reason"] == want.finish_reason

    # One prompt streams: the prompt, then the completion, on stdout.
    assert main(["generate", "tiny", *overrides, "--prompt", "def add(", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out == "def add(" + rows[0]["completion"] + "\n"  # run_dir's checkpoint is used by default


def test_bad_inputs_are_one_line_exit_2(run, capsys, tmp_path: Path) -> None:
    _, overrides, *_ = run
    base = ["generate", "tiny", *overrides]
    for flag in ("0", "1.5"):
        _one_line_exit_2(capsys, base + ["--prompt", "x", "--top-p", flag], "generate.top_p (--top-p) must be in (0, 1]")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _one_line_exit_2(capsys, base + ["--prompts-file", str(empty)], "has no prompts")
    bad = tmp_path / "bad.jsonl"
    for line, expect in [('{"prompt": "a"}\n{"text": "b"}', "bad.jsonl:2: give exactly one of"),
                         ('{"prompt_ids": [1, "x"]}', "bad.jsonl:1: \"prompt_ids\" must be"),
                         ("{not json", "bad.jsonl:1: not JSON")]:
        bad.write_text(line + "\n")
        _one_line_exit_2(capsys, base + ["--prompts-file", str(bad)], expect)
    _one_line_exit_2(capsys, base + ["--prompt", "def add(a, b): return a + b " * 8],
                     "too long for the context of 48 tokens")
