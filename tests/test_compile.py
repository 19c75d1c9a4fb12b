"""`maxlm compile`: targets, bad input, and a real compile for a small TPU and GPU topology from this CPU host.

The compiles need the optional extras (libtpu: `maxlm[tpu-compile]`, which the test extra installs; the CUDA plugin
and ptxas: `maxlm[gpu-compile]`) and are skipped with the reason when they are missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from helpers import tiny_config
from maxlm.cli import main
from maxlm.compile.cli import compile_for_target
from maxlm.compile.report import collectives
from maxlm.compile.targets import gpu_target_config, parse_target
from maxlm.config import ConfigError

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA_PLUGIN = any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)) \
    if importlib.util.find_spec("jax_plugins") else False


def test_targets_name_chips_hosts_and_memory() -> None:
    t = parse_target("tpu-v5p:4x4x4")
    assert (t.platform, t.topology, t.devices, t.hosts, t.hbm_bytes) == ("tpu", "v5:4x4x4", 64, 16, 95e9)
    t = parse_target("tpu-v6e:16x16", slices=2)
    assert (t.devices, t.slices, t.hosts) == (512, 2, 128)
    t = parse_target("h100x64")
    assert (t.platform, t.topology, t.devices, t.hosts) == ("cuda", "1x8x8", 64, 8)
    assert parse_target("a100x8").topology == "1x1x8"
    assert parse_target("h200:2x4").devices == 8
    assert 'device_description_str: "NVIDIA H200' in gpu_target_config("h200")
    for bad in ("tpu-v9:2x2", "tpu-v5p:4x4", "h100x12", "b100x8", "tpu-v5e:8"):
        with pytest.raises(ConfigError):
            parse_target(bad)


def test_unknown_target_and_device_mismatch_exit_1_with_numbers(capsys: pytest.CaptureFixture) -> None:
    assert main(["compile", "tiny", "--target", "tpu-v9:2x2"]) == 1
    assert "not a known target" in capsys.readouterr().err
    assert main(["compile", "tiny", "--target", "tpu-v5p:4x4x4"]) == 1  # tiny's mesh is 2 x 2 x 2 = 8 devices
    err = capsys.readouterr().err
    assert "64" in err and "8 devices" in err, err
    assert main(["compile", "tiny", "--target", "tpu-v5e:2x4", "--slices", "2"]) == 1
    assert "mesh.dcn_data=2" in capsys.readouterr().err


def test_missing_extra_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert main(["compile", "tiny", "--target", "tpu-v5e:2x4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["maxlm: error: compiling for tpu-v5e needs libtpu: pip install 'maxlm[tpu-compile]'"]


def test_does_not_fit_is_exit_1_with_the_numbers(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    report = {"target": "tpu-v5e:2x4", "platform": "tpu", "chip": "tpu-v5e", "devices": 8, "hosts": 2, "slices": 1,
              "mesh": {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}, "global_batch_size": 8, "seq_len": 64,
              "grad_accum": 1, "model": {"dtype": "bfloat16", "attention": "xla", "remat": "none", "ffn": "mlp"},
              "argument_bytes_per_device": 2**34, "output_bytes_per_device": 2**34, "alias_bytes_per_device": 2**34,
              "temp_bytes_per_device": 2**30, "code_bytes_per_device": 0, "peak_bytes_per_device": 17 * 2**30,
              "hbm_bytes_per_device": 16 * 10**9, "fits": False, "xla_flops_per_device": None,
              "analytic_flops_per_device": 1e12, "flops_ratio": None, "collectives": {}, "compile_s": 1.0,
              "lower_s": 1.0}
    monkeypatch.setattr("maxlm.compile.cli.compile_for_target", lambda *a, **k: report)
    assert main(["compile", "tiny", "--target", "tpu-v5e:2x4", "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["fits"] is False
    assert "peak 17.00 GiB per device > 14.90 GiB HBM of tpu-v5e" in captured.err


def test_collectives_are_counted_with_their_bytes() -> None:
    hlo = ("%ag = bf16[8,128]{1,0} all-gather(bf16[1,128]{1,0} %p), dimensions={0}\n"
           "%ars = (f32[4]{0}, f32[4]{0}) all-reduce-start(f32[4]{0} %a, f32[4]{0} %b)\n"
           "%ard = (f32[4]{0}, f32[4]{0}) all-reduce-done(%ars)\n")
    assert collectives(hlo) == {"all-gather": {"count": 1, "bytes": 2048}, "all-reduce": {"count": 1, "bytes": 32}}


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: pip install 'maxlm[tpu-compile]'")
def test_compiles_tiny_for_a_tpu_slice() -> None:
    r = compile_for_target(tiny_config(), "tpu-v5e:2x4")
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1} and r["devices"] == 8
    assert r["fits"] and 0 < r["peak_bytes_per_device"] < r["hbm_bytes_per_device"]
    assert r["argument_bytes_per_device"] > 0 and r["compile_s"] > 0
    assert r["xla_flops_per_device"] > 0 and r["analytic_flops_per_device"] > 0
    assert {"all-gather", "all-reduce"} <= set(r["collectives"])  # fsdp gathers, data/tensor reductions


@pytest.mark.skipif(not (HAS_CUDA_PLUGIN and (importlib.util.find_spec("nvidia") or shutil.which("ptxas"))),
                    reason="the JAX CUDA plugin or ptxas is missing: pip install 'maxlm[gpu-compile]'")
def test_compiles_tiny_for_eight_gpus() -> None:
    r = compile_for_target(tiny_config(), "h100x8")
    assert r["platform"] == "cuda" and r["devices"] == 8 and r["fits"]
    assert r["peak_bytes_per_device"] > r["argument_bytes_per_device"] > 0
    assert r["xla_flops_per_device"] > 0
