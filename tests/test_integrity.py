"""A run is never lost or silently corrupted: checksummed checkpoints with fallback, no poisoned newest step, and
one training per run directory (maxlm.train.integrity, maxlm.train.runlock).

States are saved and restored without stepping (nothing compiles but the checksum function), and the lock tests
stop before any model is built.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import tiny_config
from maxlm.cli import main as cli_main
from maxlm.mesh import build_mesh, logical_rules
from maxlm.model import Decoder
from maxlm.train.runlock import LOCK_NAME, DirLock
from maxlm.train.checkpoint import Checkpointer, PoisonedState
from maxlm.train.integrity import DamagedStep, fingerprint, verify
from maxlm.train.optimizer import make_optimizer
from maxlm.train.state import init_state, state_layout

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_state():
    """(mesh, layout, state) of the tiny model with random (non-zero) optimizer moments."""
    cfg = tiny_config()
    mesh, rules = build_mesh(cfg), logical_rules(cfg)
    model = Decoder(cfg.model)
    tx, _ = make_optimizer(cfg)
    layout = state_layout(cfg, model, tx, mesh, rules)
    state = init_state(cfg, model, tx, layout, mesh, rules, jax.random.key(0))
    rs = np.random.RandomState(0)
    opt = jax.tree_util.tree_map(
        lambda x, sh: jax.device_put((rs.standard_normal(x.shape) if np.issubdtype(x.dtype, np.floating)
                                      else rs.randint(1, 9, x.shape)).astype(x.dtype), sh),
        state.opt_state, layout.shardings.opt_state)
    return mesh, layout, state.replace(opt_state=opt)


def _two_steps(tmp_path: Path, tiny_state, newer=None) -> Path:
    """Saves steps 2 and 4 (4 from `newer`'s state, default the params + 1) and returns step 4's directory."""
    mesh, _, state = tiny_state
    cfg = tiny_config(f"run_dir={tmp_path}")
    with Checkpointer(cfg, mesh) as ckpt:
        ckpt.save(2, state, jax.random.key(2), None)
        four = newer or state.replace(params=jax.tree_util.tree_map(lambda x: x + 1, state.params))
        ckpt.save(4, four, jax.random.key(4), None, refuse_nonfinite=newer is None)
    return tmp_path / "checkpoints" / "4"


def _restore_falls_back(tmp_path: Path, tiny_state, caplog, reason: str) -> None:
    mesh, layout, state = tiny_state
    with Checkpointer(tiny_config(f"run_dir={tmp_path}"), mesh) as ckpt:
        restored = ckpt.restore(layout, None)
    assert restored.step == 2 and restored.fell_back_from == [4]
    np.testing.assert_array_equal(jax.device_get(restored.state.params["embed"]["embedding"]),
                                  jax.device_get(state.params["embed"]["embedding"]))
    assert (tmp_path / "checkpoints" / "4.corrupt").is_dir()
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert warned and reason in warned[0], warned


def _data_files(item: Path) -> list[Path]:
    """The array data files orbax wrote for an item (OCDBT: ocdbt.process_*/d/*), largest first."""
    return sorted((p for p in item.rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size, reverse=True)


def _flip(path: Path, offsets: list[int], mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    for off in offsets:
        data[off % len(data)] ^= mask
    path.write_bytes(bytes(data))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("item, flips", [("params", "4 bits"), ("opt_state", "16 bytes")])
def test_flipped_bits_in_array_data_fall_back(tmp_path: Path, tiny_state, caplog, item: str, flips: str) -> None:
    step4 = _two_steps(tmp_path, tiny_state)
    target = _data_files(step4 / item)[0]
    size = target.stat().st_size
    if flips == "4 bits":
        _flip(target, [size // 2 + 97 * i for i in range(4)])
    else:
        _flip(target, list(range(size // 2, size // 2 + 16)), 0xFF)
    _restore_falls_back(tmp_path, tiny_state, caplog, "checksum mismatch in " + item)


@pytest.mark.parametrize("meta", [{}, [1, 2], {"params": {"embed/embedding": "shape"}}, "edited"])
def test_meta_of_the_wrong_shape_falls_back(tmp_path: Path, tiny_state, caplog, meta) -> None:
    step4 = _two_steps(tmp_path, tiny_state)
    meta_file = step4 / "meta" / "metadata"
    if meta == "edited":  # valid and well-formed, but not what was saved: the seal catches it
        saved = json.loads(meta_file.read_text())
        meta = saved | {"process_count": 3}
    meta_file.write_text(json.dumps(meta))
    _restore_falls_back(tmp_path, tiny_state, caplog, "meta")


@pytest.mark.parametrize("train", [{}, [1, 2], {"step": 4}])
def test_train_item_of_the_wrong_shape_falls_back(tmp_path: Path, tiny_state, caplog, train) -> None:
    step4 = _two_steps(tmp_path, tiny_state)
    (step4 / "train" / "metadata").write_text(json.dumps(train))
    _restore_falls_back(tmp_path, tiny_state, caplog, "train item")


def test_nonfinite_state_is_never_the_newest_checkpoint(tmp_path: Path, tiny_state, caplog) -> None:
    mesh, _, state = tiny_state
    nan_opt = state.replace(opt_state=jax.tree_util.tree_map(
        lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x, state.opt_state))
    cfg = tiny_config(f"run_dir={tmp_path}")
    with Checkpointer(cfg, mesh) as ckpt:
        ckpt.save(2, state, jax.random.key(2), None)
        with pytest.raises(PoisonedState, match=r"step 3: opt_state .* holds NaN/Inf, so it was not saved .* "
                                                r"newest good checkpoint stays step 2"):
            ckpt.save(3, nan_opt, jax.random.key(3), None)
        assert ckpt.steps() == [2]
    # One written anyway (by an older maxlm, or on purpose) is stepped over on resume, never resumed into.
    _two_steps(tmp_path / "b", tiny_state, newer=nan_opt)
    _restore_falls_back(tmp_path / "b", tiny_state, caplog, "non-finite values (NaN/Inf) in opt_state")


def test_checksums_see_every_bit_and_position(tiny_state) -> None:
    _, _, state = tiny_state
    params = jax.device_get(state.params)
    base, _ = fingerprint(params=params)
    q = params["layers"]["attn"]["q"]
    flipped = q.copy()
    flipped.view(np.uint32).reshape(-1)[123] ^= 1 << 31  # the sign bit of one element
    swapped = q.copy().reshape(-1)
    swapped[[5, 6]] = swapped[[6, 5]]
    for changed in (flipped, swapped.reshape(q.shape)):
        tree = jax.tree_util.tree_map(lambda x: x, params)
        tree["layers"]["attn"]["q"] = changed
        sums, _ = fingerprint(params=tree)
        assert [k for k in sums["params"] if sums["params"][k] != base["params"][k]] == ["layers/attn/q"]
    verify(base, params=params)
    with pytest.raises(DamagedStep, match="checksum mismatch in params 'layers/attn/q'"):
        verify(base, params=tree)


# ----------------------------------------------------------------------------------------------------------
# The run-directory lock

HOLDER = """
import sys, time
from maxlm.train.runlock import DirLock
DirLock(sys.argv[1], "run_dir").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _hold_lock(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_training_on_a_locked_run_dir_stops_at_once(tmp_path: Path, capsys) -> None:
    holder = _hold_lock(tmp_path)
    try:
        t0 = time.perf_counter()
        code = cli_main(["train", "tiny", f"run_dir={tmp_path}", "train.steps=2", "--no-progress"])
        took = time.perf_counter() - t0
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"run_dir={tmp_path} is in use by another maxlm run (pid {holder.pid} on " in err
        assert took < 10  # refused before anything is built or compiled
        assert not (tmp_path / "checkpoints" / "2").exists() and not (tmp_path / "metrics.jsonl").exists()
        # checkpoint.dir is locked too: another run_dir writing into the same checkpoints is refused as well
        code = cli_main(["train", "tiny", f"run_dir={tmp_path}/other", f"checkpoint.dir={tmp_path}", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"checkpoint.dir={tmp_path} is in use by another maxlm run (pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    # Killed (SIGKILL): its lock file is left behind, but the kernel released the flock: taken over at once.
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    lock = DirLock(str(tmp_path), "run_dir").acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_without_flock_liveness_comes_from_pid_and_host(tmp_path: Path, monkeypatch) -> None:
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "x"}))
    DirLock(str(tmp_path), "run_dir").acquire().release()  # its holder is gone: stale
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename}))
        with pytest.raises(Exception, match=f"in use by another maxlm run \\(pid {live.pid} "):
            DirLock(str(tmp_path), "run_dir").acquire()
    finally:
        live.kill()
        live.wait()
    # Another host: alive while it refreshes the file, stale once it stops.
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(Exception, match="pid 1 on elsewhere"):
        DirLock(str(tmp_path), "run_dir").acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    DirLock(str(tmp_path), "run_dir").acquire().release()
