"""Every bad input ends with one line naming the key or path and the fix: exit code 2, no traceback.

Most cases run in-process through `maxlm.cli.main` (they stop before anything compiles); a few representative
ones run as `python -m maxlm` subprocesses, the way a user meets them, to check the real exit code and stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maxlm.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
ENV = os.environ | {"JAX_PLATFORMS": "cpu",
                    "PYTHONPATH": str(ROOT)}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("maxlm: error: "), err
    return lines[0]


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("not a directory\n")
    return f


def _fake_step(tmp_path: Path) -> Path:
    """The minimum `resolve_step_dir` recognises as a maxlm step (meta + params)."""
    step = tmp_path / "ckpt" / "0"
    (step / "params").mkdir(parents=True)
    (step / "meta").mkdir()
    (step / "meta" / "metadata").write_text(json.dumps({"params": {}, "config": {}}))
    return step


def _nan_runs(tmp_path: Path, n: int, finite: int = 0) -> Path:
    from maxlm.config import config_to_yaml, load_config, resolve_config_path

    root = tmp_path / "sweep"
    for i in range(n):
        run = root / f"r{i}"
        run.mkdir(parents=True)
        cfg = load_config(resolve_config_path("tiny"), [f"model.d_model={32 * (i + 1)}"])
        (run / "config.yaml").write_text(config_to_yaml(cfg))
        loss = 4.0 + 1.0 / (i + 1) if i < finite else "nan"
        (run / "metrics.jsonl").write_text(json.dumps({"step": 10 * (i + 1), "loss": loss}) + "\n")
    return root


CASES = {  # name: (argv built from tmp_path and a_file, the text the line must contain)
    "run_dir is a file": (lambda t, f: ["train", "tiny", f"run_dir={f}"], "run_dir={f} is an existing file"),
    "run_dir under a file": (lambda t, f: ["train", "tiny", f"run_dir={f}/run"], "{f} is a file, not a directory"),
    "checkpoint.dir is a file": (lambda t, f: ["train", "tiny", f"run_dir={t}/run", f"checkpoint.dir={f}"],
                                 "checkpoint.dir={f} is an existing file"),
    "run_dir cannot be created": (lambda t, f: ["train", "tiny", "run_dir=/proc/maxlm-run"],
                                  "run_dir=/proc/maxlm-run cannot be created"),
    "bench --steps 0": (lambda t, f: ["bench", "tiny", "--steps", "0"], "--steps must be >= 1"),
    "bench --steps -3": (lambda t, f: ["bench", "tiny", "--steps", "-3"], "--steps must be >= 1"),
    "unknown hardware": (lambda t, f: ["train", "tiny", f"run_dir={t}/run", "train.hardware=tpu-v99"],
                         "train.hardware='tpu-v99' is not one of auto, cpu, none, tpu-v4"),
    "data prepare into a file": (lambda t, f: ["data", "prepare", "tiny", f"data.cache_dir={f}"],
                                 "data.cache_dir={f} is an existing file"),
    "convert to-hf into a file": (lambda t, f: ["convert", "to-hf", str(_fake_step(t)), str(f)],
                                  "OUT={f} is an existing file"),
    "convert from-hf into a file": (lambda t, f: ["convert", "from-hf", str(t), str(f)], "OUT={f} is an existing"),
    "tokenizer --out under a file": (
        lambda t, f: ["tokenizer", "train", "--input", str(f), "--vocab-size", "300", "--out", f"{f}/tok.model"],
        "--out={f}/tok.model: {f} is a file, not a directory"),
    "optim.b2 above 1": (lambda t, f: ["train", "tiny", "optim.b2=1.5"], "optim.b2=1.5 must be in [0, 1)"),
    "optim.b1 equal to 1": (lambda t, f: ["train", "tiny", "optim.b1=1"], "optim.b1=1.0 must be in [0, 1)"),
    "optim.eps zero": (lambda t, f: ["train", "tiny", "optim.eps=0"], "optim.eps=0.0 must be positive"),
    "lr not finite": (lambda t, f: ["train", "tiny", "optim.lr=.nan"], "optim.lr=nan must be a finite number"),
    "no non-finite steps allowed": (lambda t, f: ["train", "tiny", "train.max_nonfinite_steps=0"],
                                    "train.max_nonfinite_steps=0 must be >= 1"),
    "eval_fraction of 1": (lambda t, f: ["train", "tiny", "data.eval_fraction=1.0"],
                           "data.eval_fraction=1.0 must be in [0, 1)"),
    "max_bad_fraction above 1": (lambda t, f: ["train", "tiny", "data.max_bad_fraction=1.5"],
                                 "data.max_bad_fraction=1.5 must be in [0, 1]"),
    "negative weight decay": (lambda t, f: ["train", "tiny", "optim.weight_decay=-0.1"],
                              "optim.weight_decay=-0.1 must be >= 0"),
    "memory it obviously cannot fit": (lambda t, f: ["train", "tiny", f"run_dir={t}/run", "data.seq_len=100000"],
                                       "TB per device (activations: "),
    "bench that cannot fit": (lambda t, f: ["bench", "tiny", "data.seq_len=100000"], "lower data.seq_len"),
    "plan fit on NaN runs": (lambda t, f: ["plan", "fit", str(_nan_runs(t, 5)), "--bootstrap", "0"],
                             "needs at least 5 runs with a finite loss, got 0 (5 of 5 have a NaN/Inf final loss)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case: str, tmp_path: Path, a_file: Path, capsys) -> None:
    argv, expected = CASES[case]
    code = cli_main(argv(tmp_path, a_file))
    line = _one_line(capsys.readouterr().err)
    assert code == 2, line
    assert expected.format(f=a_file, t=tmp_path) in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_dir(tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code = cli_main(["train", "tiny", f"run_dir={ro}"])
    finally:
        ro.chmod(0o700)
    assert code == 2 and f"run_dir={ro} is not writable" in _one_line(capsys.readouterr().err)


def test_plan_fit_skips_nonfinite_runs(tmp_path: Path, capsys, caplog) -> None:
    root = _nan_runs(tmp_path, 7, finite=6)
    code = cli_main(["plan", "fit", str(root), "--bootstrap", "0", "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert code == 0 and report["n_runs"] == 6
    assert all(isinstance(report[k], float) and report[k] == report[k] for k in ("E", "A", "B", "alpha", "beta"))
    assert [r.getMessage().split(": its")[0].rsplit("/", 1)[1] for r in caplog.records if "skipping" in
            r.getMessage()] == ["r6"]


@pytest.mark.parametrize("argv, expected", [
    (["train", "tiny", "run_dir={f}"], "run_dir={f} is an existing file, not a directory"),
    (["train", "tiny", "optim.b2=1.5"], "optim.b2=1.5 must be in [0, 1)"),
    (["bench", "tiny", "--steps", "0"], "--steps must be >= 1"),
])
def test_as_a_user_runs_it(argv: list[str], expected: str, a_file: Path) -> None:
    argv = [a.format(f=a_file) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "maxlm", *argv], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert expected.format(f=a_file) in _one_line(proc.stderr) and proc.stdout == ""


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 3 MB tmpfs (room for about two tiny checkpoints); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_is_one_line_exit_1_and_keeps_the_last_checkpoint(tiny_disk: Path, capsys) -> None:
    run_dir = tiny_disk / "run"
    code = cli_main(["train", "tiny", f"run_dir={run_dir}", "train.steps=30", "checkpoint.every=5", "--no-progress"])
    line = _one_line(capsys.readouterr().err)
    assert code == 1 and "no space left on device" in line, line
    last = int(line.split("the last complete checkpoint is step ")[1].split(";")[0])
    assert 5 <= last < 30 and (run_dir / "checkpoints" / str(last) / "params").is_dir()
    from maxlm.checkpoint_format import read_meta

    assert read_meta(str(run_dir / "checkpoints" / str(last)))["step"] == last
    # Room again: the same command resumes from that checkpoint (it was complete and passes its checksums).
    subprocess.run(["mount", "-o", "remount,size=40m", str(tiny_disk)], check=True)
    code = cli_main(["train", "tiny", f"run_dir={run_dir}", "train.steps=30", "checkpoint.every=5", "--no-progress"])
    assert code == 0 and f"resumed from step {last};" in capsys.readouterr().out
