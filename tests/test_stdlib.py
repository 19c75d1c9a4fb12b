"""The real corpus of `make run`: the Python standard library's own source, no download."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig

from maxlm.data.tokenizer import load_tokenizer

STDLIB = sysconfig.get_paths()["stdlib"]


def test_demo_command_end_to_end(tmp_path) -> None:
    env = dict(os.environ)  # conftest's XLA_FLAGS: 8 devices
    proc = subprocess.run([sys.executable, "-m", "maxlm.cli", "demo", f"run_dir={tmp_path}", "train.steps=4",
                           "train.log_every=2", "model.vocab_size=1024", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "def fibonacci(" in proc.stdout
    # Pretraining on the stdlib learns: from ~ln(1024) at init, down by more than 1 nat in 4 steps.
    first, last = map(float, re.search(r"first loss ([\d.]+) -> last loss ([\d.]+)", proc.stdout).groups())
    assert first > 6.5 and last < first - 1.0, (first, last)
    # Every stage ran, each for the 4 steps asked (SFT and DPO take `train.steps` from the overrides too).
    assert "[4/5] supervised fine-tuning for 4 steps" in proc.stdout and "model's answer:" in proc.stdout
    assert "[5/5] DPO" in proc.stdout and "for 4 steps" in proc.stdout.split("[5/5] DPO")[1]
    assert "rewards/accuracies: step" in proc.stdout
    assert (tmp_path / "metrics.jsonl").exists()
    # The BPE tokenizer trained on the stdlib round-trips its source exactly.
    tok = load_tokenizer(str(tmp_path / "tokenizer.model"))
    text = open(os.path.join(STDLIB, "textwrap.py")).read()
    assert tok.decode(tok.encode(text)) == text
