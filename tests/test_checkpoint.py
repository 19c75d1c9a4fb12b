"""Checkpoints: exact resume after SIGKILL, SIGTERM preemption, restore onto another mesh, corrupt-step fallback,
shape checks, non-finite steps, retention, load_parameters_from and the data iterator's process count.

Every run that steps uses one config (RUN below), so the train step compiles once per session; the other tests
save and restore states without stepping.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import tiny_config
from maxlm.cli import main as cli_main
from maxlm.config import ConfigError
from maxlm.mesh import build_mesh, logical_rules
from maxlm.model import Decoder
from maxlm.checkpoint_format import read_meta, resolve_step_dir
from maxlm.train.checkpoint import Checkpointer, load_parameters
from maxlm.train.builder import build_run
from maxlm.train.integrity import seal
from maxlm.train.loop import NonFiniteError, train, trim_metrics
from maxlm.train.metrics import read_metrics
from maxlm.train.optimizer import make_optimizer
from maxlm.train.state import init_state, state_layout

RUN = ["train.steps=60", "train.log_every=1", "checkpoint.every=4"]  # the one stepping config
ENV = os.environ | {"JAX_PLATFORMS": "cpu"}


def _layout(cfg):
    """(mesh, layout) of a config: shapes and shardings only, nothing compiled."""
    mesh, rules = build_mesh(cfg), logical_rules(cfg)
    tx, _ = make_optimizer(cfg)
    return mesh, state_layout(cfg, Decoder(cfg.model), tx, mesh, rules)


@functools.lru_cache(maxsize=None)
def _cached_state(overrides: tuple[str, ...], seed: int):
    cfg = tiny_config(*overrides)
    mesh, rules = build_mesh(cfg), logical_rules(cfg)
    model = Decoder(cfg.model)
    tx, _ = make_optimizer(cfg)
    layout = state_layout(cfg, model, tx, mesh, rules)
    state = init_state(cfg, model, tx, layout, mesh, rules, jax.random.key(seed))
    # Random optimizer moments too (a fresh Adam state is all zeros, which would not show they are restored), made
    # on the host and put on the same shards: no extra compile.
    rs = np.random.RandomState(seed)
    opt = jax.tree_util.tree_map(
        lambda x, sh: jax.device_put((rs.standard_normal(x.shape) if np.issubdtype(x.dtype, np.floating)
                                      else rs.randint(1, 9, x.shape)).astype(x.dtype), sh),
        state.opt_state, layout.shardings.opt_state)
    return mesh, layout, state.replace(opt_state=opt)


def _state(cfg, seed: int = 0):
    """(mesh, layout, state) for a config, built once per session (the states are never donated or changed)."""
    overrides = tuple(f"{k}={v}" for k, v in _flat(cfg.to_dict()) if k.startswith(("model.", "mesh.")))
    return _cached_state(overrides, seed)


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            yield f"{prefix}{k}", v


def _equal_trees(a, b) -> None:
    la, lb = jax.tree_util.tree_leaves(jax.device_get(a)), jax.tree_util.tree_leaves(jax.device_get(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"maxlm exited ({proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _logged_steps(run_dir: Path) -> list[int]:
    try:
        with open(run_dir / "metrics.jsonl") as f:
            return [json.loads(line)["step"] for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def _spawn(run_dir: Path, log: Path) -> subprocess.Popen:
    """`maxlm train` in a subprocess; output goes to files (a full pipe would block a child we are polling)."""
    return subprocess.Popen([sys.executable, "-m", "maxlm.cli", "train", "tiny", *RUN, f"run_dir={run_dir}",
                             "--no-progress"], env=ENV, stdout=open(log.with_suffix(".out"), "w"),
                            stderr=open(log.with_suffix(".err"), "w"), text=True)


def test_sigkill_and_sigterm_then_resume_match_an_uninterrupted_run(tmp_path: Path) -> None:
    ref = train(tiny_config(*RUN, f"run_dir={tmp_path}/ref"), progress=False)
    ref_losses = [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "ref"))]
    assert [s for s, _ in ref_losses] == list(range(1, 61)) and ref["saved_steps"][-1] == 60

    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    # 1. `maxlm train` in a subprocess, SIGKILLed as soon as the step-8 checkpoint is complete (orbax renames its
    #    temporary directory last), typically while the next asynchronous save is being written.
    proc = _spawn(run_dir, tmp_path / "first")
    _wait_for(lambda: (ckpts / "8").is_dir(), proc, "checkpoint 8")
    proc.kill()
    proc.wait()
    killed_at = max(_logged_steps(run_dir))
    assert killed_at < 60, "the run finished before it could be killed"
    # 2. The same command again (in this process): it resumes from the newest complete checkpoint; a SIGTERM once it
    #    has gone two steps further makes it save that step and return 0.
    def sigterm_after_progress() -> None:
        t0 = time.time()
        while max(_logged_steps(run_dir), default=0) < killed_at + 2 and time.time() - t0 < 240:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a signal landing after train() returns is harmless
    try:
        sender = threading.Thread(target=sigterm_after_progress, daemon=True)
        sender.start()
        code = cli_main(["train", "tiny", *RUN, f"run_dir={run_dir}", "--no-progress"])
        sender.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 0
    stopped_at = max(_logged_steps(run_dir))
    assert stopped_at < 60, "the run finished before SIGTERM arrived"
    assert (ckpts / str(stopped_at)).is_dir(), "SIGTERM must save the step it stopped at"
    # 3. Resume to the end: every step logged exactly once, losses bit-identical to the uninterrupted run.
    summary = train(tiny_config(*RUN, f"run_dir={run_dir}"), progress=False)
    assert summary["resumed_from"] == stopped_at
    got = [(r["step"], r["loss"]) for r in read_metrics(str(run_dir))]
    assert got == ref_losses


def test_restore_onto_another_mesh(tmp_path: Path) -> None:
    _, _, state = _state(tiny_config())
    a = tiny_config("mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1", f"run_dir={tmp_path}")
    mesh, layout = _layout(a)
    state = jax.device_put(state, layout.shardings)  # the same numbers laid out on (8, 1, 1)
    ckpt = Checkpointer(a, mesh)
    ckpt.save(0, state, jax.random.key(5), None)
    ckpt.close()
    b = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"run_dir={tmp_path}")
    mesh_b, layout_b = _layout(b)
    with Checkpointer(b, mesh_b) as ckpt_b:
        restored = ckpt_b.restore(layout_b, None)
    assert restored is not None and restored.step == 0
    _equal_trees(restored.state.params, state.params)
    _equal_trees(restored.state.opt_state, state.opt_state)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(5)))
    q = restored.state.params["layers"]["attn"]["q"]
    assert q.sharding == layout_b.shardings.params["layers"]["attn"]["q"] and q.sharding.mesh.shape["tensor"] == 2
    assert read_meta(str(tmp_path / "checkpoints" / "0"))["mesh"]["data"] == 8


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# orbax leaves a callback pending on its private event loop when a read fails; harmless, but pytest reports it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["delete params manifest", "truncate largest params file", "truncate train json",
                                    "delete meta"])
def test_corrupt_latest_step_falls_back_with_a_warning(tmp_path: Path, damage: str, caplog) -> None:
    cfg = tiny_config(f"run_dir={tmp_path}")
    mesh, layout, state = _state(cfg)
    ckpt = Checkpointer(cfg, mesh)
    ckpt.save(2, state, jax.random.key(2), None)
    ckpt.save(4, state.replace(params=jax.tree_util.tree_map(lambda x: x + 1, state.params)), jax.random.key(4), None)
    ckpt.close()
    step4 = tmp_path / "checkpoints" / "4"
    target = {"delete params manifest": step4 / "params" / "manifest.ocdbt",
              "truncate largest params file": _largest_file(step4 / "params"),
              "truncate train json": step4 / "train" / "metadata", "delete meta": step4 / "meta" / "metadata"}[damage]
    if damage.startswith("delete"):
        target.unlink()
    else:
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size // 2)
    with Checkpointer(cfg, mesh) as ckpt:
        restored = ckpt.restore(layout, None)
    assert restored.step == 2 and restored.fell_back_from == [4]
    _equal_trees(restored.state.params, state.params)
    assert (tmp_path / "checkpoints" / "4.corrupt").is_dir() and not step4.exists()
    assert any(str(step4) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    # The moved-aside step no longer blocks saving step 4 again.
    again = Checkpointer(cfg, mesh)
    assert again.save(4, restored.state, restored.rng, None)
    again.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_step_unreadable_is_one_clear_error(tmp_path: Path) -> None:
    cfg = tiny_config(f"run_dir={tmp_path}")
    mesh, layout, state = _state(cfg)
    ckpt = Checkpointer(cfg, mesh)
    ckpt.save(3, state, jax.random.key(0), None)
    ckpt.close()
    (tmp_path / "checkpoints" / "3" / "params" / "manifest.ocdbt").unlink()
    with pytest.raises(Exception, match=r"no readable checkpoint in .*step 3: "), Checkpointer(cfg, mesh) as ckpt:
        ckpt.restore(layout, None)


def test_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    cfg = tiny_config(f"run_dir={tmp_path}")
    mesh, _, state = _state(cfg)
    ckpt = Checkpointer(cfg, mesh)
    ckpt.save(1, state, jax.random.key(0), None)
    ckpt.close()
    wide = tiny_config(f"run_dir={tmp_path}", "model.d_model=128")
    _, layout = _layout(wide)
    with pytest.raises(ConfigError) as e, Checkpointer(wide, mesh) as ckpt:
        ckpt.restore(layout, None)
    msg = str(e.value)
    assert "\n" not in msg
    assert "(256, 64) in the checkpoint but (256, 128) in this config" in msg and "model.d_model=64 there" in msg
    assert (tmp_path / "checkpoints" / "1").is_dir()  # a mismatch is not corruption: nothing is moved aside


def test_retention_keeps_the_last_n_and_every_kth(tmp_path: Path) -> None:
    cfg = tiny_config(f"run_dir={tmp_path}", "checkpoint.keep_last=2", "checkpoint.keep_every=4")
    mesh, _, state = _state(cfg)
    ckpt = Checkpointer(cfg, mesh)
    for step in (2, 4, 6, 8, 10):
        ckpt.save(step, state, jax.random.key(0), None)
    ckpt.close()
    with Checkpointer(cfg, mesh) as ckpt:
        assert ckpt.steps() == [4, 8, 10]


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path: Path) -> None:
    cfg = tiny_config(*RUN, "checkpoint.every=2", "train.max_nonfinite_steps=3", f"run_dir={tmp_path}")
    run = build_run(cfg, resume=True)
    clean = run.batches

    def poisoned():  # from the 5th batch on, NaN token weights (what a corrupt record does to the loss)
        for i, batch in enumerate(clean):
            if i >= 4:
                w = batch.targets_weights
                batch = batch.replace(targets_weights=jax.device_put(np.full(w.shape, np.nan, np.float32), w.sharding))
            yield batch

    run.batches = poisoned()
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite steps .* up to step 7; .* the last checkpoint "
                                             r"is step 4 in"):
        train(cfg, progress=False, run=run)
    rows = {r["step"]: r for r in read_metrics(str(tmp_path))}
    assert [rows[s]["nonfinite_steps"] for s in (4, 5, 6, 7)] == [0, 1, 2, 3]
    assert rows[5]["loss"] == "nan"
    assert rows[5]["param_norm"] == rows[6]["param_norm"] == rows[7]["param_norm"] == rows[4]["param_norm"]
    with Checkpointer(cfg, run.mesh) as ckpt:
        assert ckpt.steps() == [2, 4]  # no save during the streak: step 6 was skipped


def test_nan_weights_are_refused_and_a_diverging_run_exits_1_with_one_line(tmp_path: Path, capsys) -> None:
    cfg = tiny_config(f"run_dir={tmp_path}/src")
    mesh, _, state = _state(cfg)
    ckpt = Checkpointer(cfg, mesh)
    ckpt.save(0, state.replace(params=jax.tree_util.tree_map(lambda x: x * np.nan, state.params)), jax.random.key(0),
              None, refuse_nonfinite=False)  # a poisoned source: maxlm itself never saves one
    ckpt.close()
    code = cli_main(["train", "tiny", *RUN, f"run_dir={tmp_path}/run", f"load_parameters_from={tmp_path}/src",
                     "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "non-finite values (NaN/Inf) in params" in err, err
    # A learning rate that blows the weights up: every step from the second on is non-finite and skipped.
    code = cli_main(["train", "tiny", *RUN, f"run_dir={tmp_path}/run", "optim.lr=1e30", "optim.warmup_steps=0",
                     "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "3 consecutive non-finite steps" in err, err


def test_load_parameters_from_checkpoint_any_layout(tmp_path: Path) -> None:
    cfg = tiny_config(f"run_dir={tmp_path}")
    mesh, _, state = _state(cfg)
    ckpt = Checkpointer(cfg, mesh)
    ckpt.save(7, state, jax.random.key(0), None)
    ckpt.close()
    assert resolve_step_dir(str(tmp_path)) == resolve_step_dir(str(tmp_path / "checkpoints")) == (
        str(tmp_path / "checkpoints" / "7"), 7)
    same = load_parameters(str(tmp_path / "checkpoints" / "7"), cfg, _layout(cfg)[1])
    _equal_trees(same, state.params)
    flat = tiny_config("model.scan_layers=false", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1")
    _, layout = _layout(flat)
    params = load_parameters(str(tmp_path), flat, layout)
    saved = jax.device_get(state.params)
    for i in range(2):
        np.testing.assert_array_equal(params[f"layers_{i}"]["attn"]["q"], saved["layers"]["attn"]["q"][i])
        np.testing.assert_array_equal(params[f"layers_{i}"]["mlp"]["down"], saved["layers"]["mlp"]["down"][i])
    assert params["layers_1"]["attn"]["o"].sharding == layout.shardings.params["layers_1"]["attn"]["o"]
    with pytest.raises(ConfigError, match=r"layer 0 attn\.o has shape \(4, 16, 64\) in the checkpoint but "
                                          r"\(8, 16, 64\) in this config"):
        wide = tiny_config("model.scan_layers=false", "model.n_heads=8", "model.head_dim=16", "mesh.data=8",
                           "mesh.fsdp=1", "mesh.tensor=1")
        load_parameters(str(tmp_path), wide, _layout(wide)[1])


def test_data_position_with_another_process_count_is_refused_or_reshuffled(tmp_path: Path) -> None:
    cfg = tiny_config(f"run_dir={tmp_path}")
    run = build_run(cfg)
    for _ in range(3):
        next(run.batches)
    ckpt = Checkpointer(cfg, run.mesh)
    ckpt.save(3, run.state.replace(step=run.state.step + 3), run.rng, run.data_iter)
    ckpt.close()
    step = tmp_path / "checkpoints" / "3"
    assert json.loads((step / "data" / "process_0-of-1.json").read_text())
    resumed = build_run(cfg, resume=True)
    resumed.checkpointer.close()
    assert resumed.resumed_from == 3
    # Pretend two processes wrote it (each reading its own half of the documents).
    meta = read_meta(str(step))
    (step / "meta" / "metadata").write_text(json.dumps(seal(meta | {"process_count": 2})))  # a consistent edit
    saved = json.loads((step / "data" / "process_0-of-1.json").read_text())
    for i in range(2):
        (step / "data" / f"process_{i}-of-2.json").write_text(json.dumps(saved | {"shard_count": 2, "shard_index": i}))
    with pytest.raises(ConfigError, match="data.resume=reshuffle"):
        build_run(cfg, resume=True)
    resumed = build_run(tiny_config(f"run_dir={tmp_path}", "data.resume=reshuffle"), resume=True)
    resumed.checkpointer.close()
    assert resumed.resumed_from == 3


def test_trim_metrics_drops_rows_after_the_restored_step(tmp_path: Path) -> None:
    rows = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 5, "lo')  # the kill cut the last line
    assert trim_metrics(str(tmp_path), 2) == 3
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]


@pytest.mark.skipif(os.environ.get("MAXLM_MULTIHOST_TESTS") != "1",
                    reason="two processes compile the step cold (~40 s on 2 cores); set MAXLM_MULTIHOST_TESTS=1")
def test_sigterm_on_one_host_saves_the_same_step_on_all(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "maxlm.cli", "train", "tiny", "train.steps=400", "train.log_every=1",
         f"run_dir={tmp_path}", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=ENV | {"XLA_FLAGS": ENV["XLA_FLAGS"].replace("count=8", "count=4"),
                   "MAXLM_COORDINATOR": f"127.0.0.1:{port}",
                   "MAXLM_NUM_PROCESSES": "2", "MAXLM_PROCESS_ID": str(i)}) for i in range(2)]
    _wait_for(lambda: max(_logged_steps(tmp_path), default=0) >= 3, procs[0], "three steps")
    procs[1].send_signal(signal.SIGTERM)  # the notice reaches one host only
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    steps = [int(o.split("after saving step ")[1].split(";")[0]) for o, _ in outs]
    assert steps[0] == steps[1] < 400
    data = tmp_path / "checkpoints" / str(steps[0]) / "data"
    assert sorted(p.name for p in data.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert math.isfinite(read_metrics(str(tmp_path))[-1]["loss"])
