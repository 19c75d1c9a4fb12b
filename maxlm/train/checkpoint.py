"""Checkpoints that never lose a run: orbax save and resume, integrity fallback, and `load_parameters_from`.

One directory per step under `checkpoint.dir` (default `{run_dir}/checkpoints`), written by an orbax
CheckpointManager over tensorstore (local paths or any URL they accept, e.g. gs://), in the layout that
`maxlm.checkpoint_format` defines (params, opt_state, train, data, meta items).

Parameters and optimizer state are separate items so that `load_parameters_from` and `maxlm convert to-hf` read
the parameters alone, whatever optimizer wrote them; `meta` lets every reader check shapes before touching arrays.

Restores read shapes from `meta` first: a different model fails with one line naming both shapes (ConfigError),
while anything that makes a step untrustworthy makes the run warn, move that step aside as `{step}.corrupt` and
fall back to the next older one: a truncated or deleted file, JSON of the wrong shape, an array whose checksum
differs from the one saved with it (maxlm.train.integrity), or parameters / optimizer state holding NaN/Inf. A
state with NaN/Inf is never saved in the first place (`PoisonedState`).
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from maxlm.checkpoint_format import ITEM_DATA, ITEM_META, ITEM_OPT, ITEM_PARAMS, ITEM_TRAIN, META_FILE, checkpoint_dir, \
    make_meta, read_meta, resolve_step_dir, tree_shapes
from maxlm.config import Config, ConfigError
from maxlm.mesh import replicated
from maxlm.train.integrity import CHECKSUM_KIND, DamagedStep, check_meta, check_train, fingerprint, seal, verify
from maxlm.train.state import StateLayout, TrainState

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"
# orbax's replica-parallel save splits each replicated array among its replicas with one eager slice per shard,
# compiled per shape: that made the first save of even the `tiny` model take ~3.5 s on 8 CPU devices. Splitting pays
# off only for large arrays, so slices must be at least this big.
REPLICA_PARALLEL_MIN_BYTES = 16 * 2**20


class TrainingError(RuntimeError):
    """Stops a run for a reason the user has to act on; `maxlm train` prints it as one line and exits with 1."""


class CheckpointError(TrainingError):
    """A checkpoint problem the run cannot get past (e.g. no step is readable)."""


class PoisonedState(TrainingError):
    """The state to save holds NaN/Inf: saving it would make it the newest checkpoint every resume starts from."""


def describe_mismatch(what: str, saved: dict[str, list], wanted: dict[str, list], saved_model: dict[str, Any] | None,
                      model: dict[str, Any]) -> str | None:
    """One line naming the first leaf whose shape differs (or that only one side has), plus the model keys that
    differ; None when every shape matches (dtypes may differ: restoring casts)."""
    problem = None
    for key in sorted(set(saved) | set(wanted)):
        if key not in saved:
            problem = f"{what} {key!r} with shape {tuple(wanted[key][0])} is not in the checkpoint"
        elif key not in wanted:
            problem = f"the checkpoint has {what} {key!r} (shape {tuple(saved[key][0])}) that this config does not"
        elif saved[key][0] != wanted[key][0]:
            problem = (f"{what} {key!r} has shape {tuple(saved[key][0])} in the checkpoint but "
                       f"{tuple(wanted[key][0])} in this config")
        if problem:
            break
    if problem is None:
        return None
    if saved_model:
        numerics = ("dtype", "param_dtype", "attention", "remat")  # do not change shapes
        diffs = [f"model.{k}={saved_model[k]!r} there vs {model.get(k)!r} here" for k in sorted(saved_model)
                 if k in model and saved_model[k] != model[k] and k not in numerics]
        if diffs:
            problem += " (" + ", ".join(diffs[:4]) + ")"
    return problem


# ----------------------------------------------------------------------------------------------------------
# Saving and resuming a run


@dataclass
class Restored:
    """A train state put back from a checkpoint, with what the loop needs besides the arrays."""

    step: int
    state: TrainState
    rng: jax.Array
    data_restored: bool  # False: the checkpoint (or the run's iterator) had no data position to restore
    fell_back_from: list[int]  # unreadable newer steps that were moved aside


def _has_data_state(it: Any) -> bool:
    import grain

    return isinstance(it, grain.DatasetIterator)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _array_tree_handler() -> ocp.PyTreeCheckpointHandler:
    """orbax's pytree handler (the StandardSave on-disk format) with replica-parallel writes limited to large
    slices (REPLICA_PARALLEL_MIN_BYTES); a registry of its own, so orbax's global one is left alone."""
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()), (str, th.StringHandler()),
        (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _tree_restore(abstract: Any) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class Checkpointer:
    """The run's orbax CheckpointManager: asynchronous saves with retention, resume with integrity fallback.

    Retention: the newest `checkpoint.keep_last` steps (0: all), plus every step that is a multiple of
    `checkpoint.keep_every`, forever. Saves are only requested through `save` (the loop decides when), so orbax's
    own interval and preemption policies never fire.
    """

    def __init__(self, cfg: Config, mesh: Mesh) -> None:
        c = cfg.checkpoint
        self.cfg = cfg
        self.directory = checkpoint_dir(cfg)
        self.mesh = mesh
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(c.keep_last if c.keep_last > 0 else None)]
        if c.keep_every > 0:
            policies.append(ocp.checkpoint_managers.EveryNSteps(c.keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=c.async_save, cleanup_tmp_directories=True,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
        import grain

        handlers = {ITEM_PARAMS: _array_tree_handler(), ITEM_OPT: _array_tree_handler(),
                    ITEM_TRAIN: ocp.JsonCheckpointHandler(), ITEM_META: ocp.JsonCheckpointHandler(),
                    ITEM_DATA: grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._meta_cache: dict[str, Any] | None = None

    # -- saving --

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return str(epath.Path(self.directory) / str(step))

    def save(self, step: int, state: TrainState, rng: jax.Array, data_iter: Any, *,
             refuse_nonfinite: bool = True) -> bool:
        """Starts saving `state` (taken at the boundary after `step` steps); False if that step already exists.

        Checksums of every parameter and optimizer-state array go into the `train` item (maxlm.train.integrity);
        a state holding NaN/Inf raises PoisonedState instead of being saved (`refuse_nonfinite=False` is for tests
        and tools that write such a state on purpose). With `checkpoint.async_save` this returns once the arrays
        are copied to host memory and the files are written in the background; the next save, `wait` or `close`
        waits for them.
        """
        if step in self.manager.all_steps():
            return False
        sums, nonfinite = fingerprint(params=state.params, opt_state=state.opt_state)
        if nonfinite and refuse_nonfinite:
            newest = max(self.steps(), default=None)
            last = f"the newest good checkpoint stays step {newest}" if newest is not None else "nothing was saved"
            raise PoisonedState(f"step {step}: {nonfinite[0]} holds NaN/Inf, so it was not saved as a checkpoint; "
                                f"{last}")
        run, total = (int(x) for x in jax.device_get((state.nonfinite_run, state.nonfinite_total)))
        train = seal({"step": step, "rng": np.asarray(jax.random.key_data(rng)).tolist(), "nonfinite_run": run,
                      "nonfinite_total": total, "checksum_kind": CHECKSUM_KIND, "checksums": sums})
        if self._meta_cache is None:
            self._meta_cache = make_meta(self.cfg, step, state.params, state.opt_state,
                                         mesh_shape=dict(self.mesh.shape), process_count=jax.process_count(),
                                         source="train")
        meta = seal(self._meta_cache | {"step": step, "time": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds")})
        items: dict[str, Any] = {ITEM_PARAMS: ocp.args.PyTreeSave(state.params),
                                 ITEM_OPT: ocp.args.PyTreeSave(state.opt_state),
                                 ITEM_TRAIN: ocp.args.JsonSave(train), ITEM_META: ocp.args.JsonSave(meta)}
        if _has_data_state(data_iter):
            import grain

            items[ITEM_DATA] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        return True

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- resuming --

    def restore(self, layout: StateLayout, data_iter: Any) -> Restored | None:
        """The newest readable checkpoint onto `layout` (whatever mesh wrote it), or None when there is none.

        Raises ConfigError when the checkpoint belongs to a different model or optimizer (nothing is moved aside
        then) or when the data iterator refuses the saved position (see `_data_state`), and CheckpointError when
        checkpoints exist but none is readable.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        failed: list[tuple[int, str]] = []
        for step in steps:
            where = f"checkpoint {self.step_dir(step)}"
            meta, error = {}, ""
            try:
                meta = check_meta(read_meta(self.step_dir(step)))
            except Exception as e:  # unreadable or malformed metadata: a damaged step
                error = _short(e)
            if not self._agree(not error):
                failed.append((step, error or "unreadable on another process"))
                continue
            self._check_compatible(meta, layout, where)
            items: dict[str, Any] = {
                ITEM_PARAMS: _tree_restore(_with_shardings(layout.abstract.params, layout.shardings.params)),
                ITEM_OPT: _tree_restore(_with_shardings(layout.abstract.opt_state, layout.shardings.opt_state)),
                ITEM_TRAIN: ocp.args.JsonRestore()}
            out, data_state, train = None, None, {}
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(**items))
                train = check_train(out[ITEM_TRAIN])
                data_state = self._data_state(step, meta, data_iter)
            except ConfigError:
                raise
            except Exception as e:  # a truncated/deleted array file, bad JSON, ...: this step is damaged
                error = _short(e)
            if not self._agree(not error):
                failed.append((step, error or "unreadable on another process"))
                continue
            try:  # every process runs this collective computation, hence after the agreement above
                verify(train.get("checksums"), params=out[ITEM_PARAMS], opt_state=out[ITEM_OPT])
            except DamagedStep as e:  # the same verdict on every process: the checksums are global
                failed.append((step, str(e)))
                continue
            if data_state is not None:
                try:
                    data_iter.set_state(data_state)  # may refuse with a ConfigError that says what to do
                except ConfigError:
                    raise
                except Exception as e:  # parseable but malformed iterator state
                    error = _short(e)
                if not self._agree(not error):
                    failed.append((step, error or "data position unreadable on another process"))
                    continue
            self._quarantine(failed)
            if data_state is None and _has_data_state(data_iter):
                log.warning("%s has no data-iterator state; the data stream starts from its beginning", where)
            return Restored(step=step, state=self._state(out, layout), rng=jax.random.wrap_key_data(
                np.asarray(out[ITEM_TRAIN]["rng"], np.uint32)), data_restored=data_state is not None,
                fell_back_from=[s for s, _ in failed])
        if failed:
            listing = "; ".join(f"step {s}: {e}" for s, e in failed)
            raise CheckpointError(f"no readable checkpoint in {self.directory} ({listing}); move the bad steps away "
                                  "to start over from scratch")
        return None

    def _data_state(self, step: int, meta: dict[str, Any], data_iter: Any) -> dict[str, Any] | None:
        """This process's saved data-iterator state (None when the checkpoint or the iterator has none).

        Same process count: the state this process saved, so the stream continues exactly. Changed count: there
        is no exact continuation (each process read its own shard of the documents), so process i gets saved state
        min(i, n_saved - 1), which carries the step and stage; maxlm's data iterator then refuses with a one-line
        ConfigError unless `data.resume=reshuffle`, in which case it keeps the step and reshuffles. A plain grain
        iterator cannot reshuffle, so it is refused here.
        """
        data_dir = epath.Path(self.step_dir(step)) / ITEM_DATA
        if not _has_data_state(data_iter) or not data_dir.exists():
            return None
        saved_n, n, i = int(meta.get("process_count", 1)), jax.process_count(), jax.process_index()
        state = json.loads((data_dir / f"process_{min(i, saved_n - 1)}-of-{saved_n}.json").read_text())
        if not isinstance(state, dict):
            raise DamagedStep(f"the data position of process {i} is not a JSON object")
        if saved_n != n and "maxlm_data_stream" not in state:
            raise ConfigError(f"checkpoint {self.step_dir(step)} holds the data positions of {saved_n} process(es) "
                              f"but this run has {n}; relaunch with {saved_n} processes to resume")
        return state

    def _state(self, out: Any, layout: StateLayout) -> TrainState:
        train = out[ITEM_TRAIN]
        rep = replicated(self.mesh)

        def scalar(v: int) -> jax.Array:
            return jax.device_put(np.int32(v), rep)

        return TrainState(step=scalar(train["step"]), params=out[ITEM_PARAMS], opt_state=out[ITEM_OPT],
                          nonfinite_run=scalar(train["nonfinite_run"]),
                          nonfinite_total=scalar(train["nonfinite_total"]))

    def _check_compatible(self, meta: dict[str, Any], layout: StateLayout, where: str) -> None:
        model = self.cfg.to_dict()["model"]
        saved_model = (meta.get("config") or {}).get("model")
        problem = describe_mismatch("parameter", meta["params"], tree_shapes(layout.abstract.params), saved_model,
                                    model)
        if problem:
            raise ConfigError(f"{where} does not fit this config: {problem}; use the model settings it was written "
                              "with, or another checkpoint.dir / run_dir")
        if meta.get("opt_state") is not None:
            problem = describe_mismatch("optimizer state", meta["opt_state"], tree_shapes(layout.abstract.opt_state),
                                        None, model)
            if problem:
                raise ConfigError(f"{where} was written with a different optimizer setup: {problem} (did optim.* "
                                  "such as clip_norm or weight_decay change?); restore with the same optim settings, "
                                  "or start from its weights alone with load_parameters_from and a new run_dir")

    def _agree(self, ok: bool) -> bool:
        """True only if every process read the step: all hosts must resume from the same one."""
        if jax.process_count() == 1:
            return ok
        from jax.experimental import multihost_utils

        return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))

    def _quarantine(self, failed: list[tuple[int, str]]) -> None:
        """Moves unreadable steps aside (never deletes them), so that a later save of the same step can proceed and
        a person can still inspect what went wrong."""
        if not failed:
            return
        if jax.process_index() == 0:
            for step, error in failed:
                src = epath.Path(self.step_dir(step))
                dst = epath.Path(self.directory) / f"{step}{CORRUPT_SUFFIX}"
                n = 1
                while dst.exists():
                    dst, n = epath.Path(self.directory) / f"{step}{CORRUPT_SUFFIX}{n}", n + 1
                src.rename(dst)
                log.warning("checkpoint %s is unreadable (%s); moved it to %s and fell back to an older step", src,
                            error, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("maxlm_checkpoint_quarantine")
        self.manager.reload()


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] if isinstance(e, DamagedStep) else f"{type(e).__name__}: {text[:300]}"


# ----------------------------------------------------------------------------------------------------------
# load_parameters_from


def load_parameters(path: str, cfg: Config, layout: StateLayout) -> Any:
    """Parameters for `layout` (already on their shards) from a maxlm checkpoint or a Hugging Face directory.

    Only the parameters are read: optimizer state and step start fresh. A checkpoint of the same layout is restored
    by orbax (each process reads only its shards); a different layer layout (scanned vs unscanned) or a Hugging
    Face model goes through `maxlm.convert`, which reads one layer tensor at a time. Shapes are checked against the
    config first; a mismatch is a one-line ConfigError naming both shapes.
    """
    return load_parameters_onto(path, cfg, layout.abstract.params, layout.shardings.params)


def load_parameters_onto(path: str, cfg: Config, abstract_params: Any, shardings: Any) -> Any:
    """`load_parameters` for any tree of the model's parameters with their shardings (a LoRA run's frozen base
    is not the state's `params`); dtypes are those of `abstract_params` (the base may be held in bfloat16)."""
    from maxlm.convert.hf import is_hf_dir, load_hf_params

    abstract = _with_shardings(abstract_params, shardings)
    if is_hf_dir(path):
        return load_hf_params(path, cfg.model, abstract)
    step_dir, _ = resolve_step_dir(path)
    where = f"load_parameters_from={path}"
    try:
        meta = check_meta(read_meta(step_dir))
    except Exception as e:
        raise ConfigError(f"{where}: {step_dir} has unreadable metadata ({_short(e)}); give another step "
                          "directory") from None
    wanted = tree_shapes(abstract_params)
    if describe_mismatch("parameter", meta["params"], wanted, None, {}) is None:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(str(epath.Path(step_dir) / ITEM_PARAMS), abstract)
        try:
            verify(_saved_param_checksums(step_dir), params=params)
        except DamagedStep as e:
            raise ConfigError(f"{where}: {step_dir} is damaged ({e}); give an older step directory") from None
        return params
    from maxlm.convert.layout import assemble_params
    from maxlm.convert.params_store import CheckpointUnitSource

    return assemble_params(CheckpointUnitSource(step_dir), cfg.model, abstract, where=where)


def _saved_param_checksums(step_dir: str) -> dict[str, Any] | None:
    """The parameters' checksums saved with a training step (None for steps without them, e.g. from convert)."""
    train_file = epath.Path(step_dir) / ITEM_TRAIN / META_FILE
    if not train_file.exists():
        return None
    try:
        sums = check_train(json.loads(train_file.read_text())).get("checksums")
    except Exception as e:
        raise DamagedStep(f"its train item is unreadable: {_short(e)}") from None
    return {"params": sums["params"]} if sums and "params" in sums else None
