"""Held-out evaluation in the training loop, and `maxlm data prepare` / `maxlm bench-data` as a user runs them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_config
from maxlm.data import EOS_ID, build_eval_batches, load_tokenizer, train_tokenizer
from maxlm.train.metrics import read_metrics

ENV = os.environ | {"JAX_PLATFORMS": "cpu"}
WORDS = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("evalcorpus")
    docs = [f"item {i}: " + " ".join(WORDS[(i + j * 3) % 8] for j in range(4 + i % 11)) + " é\n" for i in range(80)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "all.txt").write_text("".join(docs))
    return root, train_tokenizer(str(root / "all.txt"), 300, str(root / "tok.model"))


def test_eval_loss_and_bits_per_byte_in_metrics(tmp_path: Path, corpus: tuple[Path, str]) -> None:
    from maxlm.train.evaluate import make_evaluator
    from maxlm.train.builder import build_run
    from maxlm.train.loop import train

    root, tok = corpus
    cfg = tiny_config("data.source=jsonl", f"data.path={root}/docs.jsonl", f"data.tokenizer={tok}",
                      "model.vocab_size=300", "data.seq_len=32", "data.eval_fraction=0.25", "train.steps=4",
                      "train.log_every=2", "train.eval_every=2", "train.eval_steps=2", f"run_dir={tmp_path}")
    run = build_run(cfg)
    evaluate = make_evaluator(cfg, run.mesh, run.rules, run.model)
    assert evaluate is not None
    first = evaluate(run.state)
    assert abs(first["loss"] - math.log(300)) < 0.5  # ~uniform at init
    # bits per byte = nats / ln 2 / bytes, where the bytes are those of the held-out text behind the targets
    batches = build_eval_batches(cfg.data, vocab_size=300, batch_size=cfg.micro_batch_size, seed=cfg.seed,
                                 num_batches=2)
    t = load_tokenizer(tok)
    nbytes = 0
    for b in batches:
        for r in range(b["targets"].shape[0]):
            seg = b["inputs_segment_ids"][r]
            for s in np.unique(seg[seg > 0]):
                ids = b["targets"][r][seg == s]
                nbytes += len(t.decode(ids[ids != EOS_ID]).encode("utf-8"))
    assert first["tokens"] == sum(b["targets_weights"].sum() for b in batches)
    assert first["bits_per_byte"] == pytest.approx(first["loss"] * first["tokens"] / math.log(2) / nbytes, rel=1e-5)
    assert evaluate(run.state.params) == first  # the same held-out tokens every time

    run.evaluate = evaluate
    train(cfg, progress=False, run=run)
    rows = read_metrics(str(tmp_path))
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all("eval_bits_per_byte" in r for r in evals)
    assert all(0.9 < r["data_fill_rate"] <= 1 and r["data_mix_jsonl"] == 1.0 for r in rows if "loss" in r)


def maxlm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "maxlm.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"maxlm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_prepare_and_bench_data_commands(tmp_path: Path, corpus: tuple[Path, str]) -> None:
    root, tok = corpus
    (tmp_path / "mix.yml").write_text(
        f"base_config: {Path(__file__).resolve().parent.parent / 'configs' / 'models' / 'tiny.yml'}\n"
        "model: {vocab_size: 300}\n"
        f"data:\n  tokenizer: {tok}\n  cache_dir: {tmp_path / 'cache'}\n  seq_len: 32\n  mixture:\n"
        f"    - {{name: items, path: '{root}/docs.jsonl', weight: 0.8}}\n"
        f"    - {{name: text, path: '{root}/all.txt', text_split: file, weight: 0.2}}\n")
    out = maxlm("data", "prepare", str(tmp_path / "mix.yml"), "--no-progress").stdout
    assert "items" in out and "data.cache_dir=" in out and (tmp_path / "cache" / "manifest.json").exists()
    again = maxlm("data", "prepare", str(tmp_path / "mix.yml"), "--json").stdout
    assert json.loads(again)["components"]["items"]["documents"] == 80

    bench = json.loads(maxlm("bench-data", str(tmp_path / "mix.yml"), "--json", "--batches", "5", "--workers", "1")
                       .stdout.strip().splitlines()[-1])
    for section in ("pipeline", "cache_read", "cache_pipeline"):
        assert bench[section]["tokens_per_s"] > 0, bench
    assert bench["pipeline"]["num_workers"] == 1 and set(bench["cache_pipeline"]["mix"]) == {"items", "text"}

    bad = maxlm("data", "prepare", str(tmp_path / "mix.yml"), "data.cache_dir=", check=False)
    assert bad.returncode == 2 and "data.cache_dir is empty" in bad.stderr and "Traceback" not in bad.stderr
    moved = maxlm("train", str(tmp_path / "mix.yml"), f"data.cache_dir={tmp_path / 'nowhere'}", check=False)
    assert moved.returncode == 2 and "run `maxlm data prepare CONFIG` first" in moved.stderr
