"""The real corpus of `make run`: the Python standard library's own source, no download."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import numpy as np

from helpers import tiny_config
from maxlm.data.tokenizer import load_tokenizer, train_tokenizer
from maxlm.train.loop import train

STDLIB = sysconfig.get_paths()["stdlib"]


def test_loss_falls_on_stdlib_source(tmp_path) -> None:
    tok = train_tokenizer(f"{STDLIB}/json/*.py,{STDLIB}/email/*.py,{STDLIB}/*.py", 1024, str(tmp_path / "tok.model"),
                          max_bytes=500_000)
    text = open(os.path.join(STDLIB, "textwrap.py")).read()
    assert load_tokenizer(tok).decode(load_tokenizer(tok).encode(text)) == text
    cfg = tiny_config("data.source=text", f"data.path={STDLIB}/*.py", f"data.tokenizer={tok}", "model.vocab_size=1024",
                      "model.d_model=128", "model.ffn_dim=384", "data.seq_len=128", "train.steps=40",
                      "train.log_every=1", "optim.lr=5e-3", "optim.warmup_steps=5", f"run_dir={tmp_path}/run")
    losses = np.array([loss for _, loss in train(cfg, progress=False)["losses"]])
    assert losses[0] > 6.5  # ~ln(1024) at init
    assert losses[-10:].mean() < losses[0] - 1.5, losses


def test_demo_command_end_to_end(tmp_path) -> None:
    env = dict(os.environ)  # conftest's XLA_FLAGS: 8 devices
    proc = subprocess.run([sys.executable, "-m", "maxlm.cli", "demo", f"run_dir={tmp_path}", "train.steps=4",
                           "train.log_every=2", "model.vocab_size=1024", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "first loss" in proc.stdout and "def fibonacci(" in proc.stdout
    # Every stage ran, each for the 4 steps asked (SFT and DPO take `train.steps` from the overrides too).
    assert "[4/5] supervised fine-tuning for 4 steps" in proc.stdout and "model's answer:" in proc.stdout
    assert "[5/5] DPO" in proc.stdout and "for 4 steps" in proc.stdout.split("[5/5] DPO")[1]
    assert "rewards/accuracies: step" in proc.stdout
    assert (tmp_path / "tokenizer.model").exists() and (tmp_path / "metrics.jsonl").exists()
