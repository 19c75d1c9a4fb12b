"""The `maxlm` command end to end, in subprocesses, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = os.environ | {"JAX_PLATFORMS": "cpu"}


def maxlm(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "maxlm.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"maxlm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_config_prints_resolved_yaml() -> None:
    out = maxlm("config", "tiny", "train.steps=7", "model.d_model=128").stdout
    assert "steps: 7" in out and "d_model: 128" in out and "rules:" in out


def test_inspect_json_70b_without_allocating() -> None:
    report = json.loads(maxlm("inspect", "llama3-70b", "--json", "--devices", "256").stdout)
    assert report["total_params"] == 70_553_706_496
    q = report["params"]["layers.attn.q"]
    assert q["shape"] == [80, 8192, 64, 128]
    assert q["logical_axes"] == ["layers", "embed", "heads", "head_dim"]
    assert q["spec"] == [None, "fsdp", "tensor", None]
    # fsdp=32 x tensor=8 splits q 256 ways: 80*8192*64*128 f32 / 256
    assert q["bytes_per_device"] == 80 * 8192 * 64 * 128 * 4 // 256
    assert set(report["bytes_per_device"]) >= {"params", "optimizer", "gradients", "total_state"}


def test_inspect_table() -> None:
    out = maxlm("inspect", "tiny").stdout
    assert "layers.mlp.gate" in out and "total parameters: 106,816" in out


def test_train_and_bench(tmp_path) -> None:
    out = maxlm("train", "tiny", f"run_dir={tmp_path}", "train.steps=4", "train.log_every=2", "--no-progress").stdout
    assert "trained 4 steps" in out
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 4]
    res = json.loads(maxlm("bench", "tiny", "--steps", "3", "--json").stdout.strip().splitlines()[-1])
    for key in ("compile_s", "step_s_median", "tokens_per_s", "tflops_per_device", "mfu", "peak_bytes_per_device"):
        assert key in res
    assert res["tokens_per_s"] > 0 and res["mfu"] is None and res["peak_bytes_per_device"] > 0


@pytest.mark.parametrize("args, message", [
    (["train", "tiny", "train.stepz=1"], "unknown config key 'train.stepz'; did you mean train.steps?"),
    (["train", "tiny", "mesh.data=3", "mesh.fsdp=1"], "devices, but 8 are available"),
    (["train", "tiny", "train.global_batch_size=10"], "is not divisible by the data-parallel size 4"),
    (["train", "tiny", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8"], "model.n_heads=4 is not divisible by mesh.tensor=8"),
    (["train", "tiny", "data.source=text", "data.path=/no/such/dir/*.txt"], "data.tokenizer is empty"),
    (["train", "missing-preset"], "config file not found: missing-preset"),
])
def test_errors_are_one_line_exit_2(args: list[str], message: str) -> None:
    proc = maxlm(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_tokenizer_train_and_empty_corpus(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + 1\n\n\nclass C{i}:\n    pass\n" * 5)
    out = maxlm("tokenizer", "train", "--input", f"{src}/*.py", "--vocab-size", "300", "--out", f"{tmp_path}/t.model")
    assert os.path.isfile(tmp_path / "t.model"), out.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    proc = maxlm("train", "tiny", "model.vocab_size=320", "data.source=text", f"data.path={empty}/*.txt",
                 f"data.tokenizer={tmp_path}/t.model",
                 check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(empty) in proc.stderr
