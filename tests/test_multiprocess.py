"""Per-host data sharding across two real JAX processes on localhost (gloo collectives on CPU).

Both processes are started by `maxlm.launch.local` (the launcher behind `maxlm launch local`) (4 fake CPU devices each, one 8-device mesh). Each
builds only its own data shard, turns its rows into a global batch with `jax.make_array_from_process_local_data`
(maxlm.train.batch.global_batch) and gathers it back. The union of the two processes' rows must equal the global
batch a single process assembles from both shards, and the files each process opened must be disjoint.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from maxlm.config import load_config, resolve_config_path
from maxlm.data import BATCH_KEYS, build_dataset, train_tokenizer
from maxlm.launch.local import LocalLaunch, run

ROOT = Path(__file__).resolve().parent.parent
STEPS = 2

WORKER = '''
import json, sys
from maxlm.distributed import initialize

initialize()  # MAXLM_COORDINATOR / MAXLM_NUM_PROCESSES / MAXLM_PROCESS_ID from the launcher
import jax
import numpy as np
from jax.experimental import multihost_utils

from maxlm.config import load_config, resolve_config_path
from maxlm.data import build_dataset
from maxlm.data.sources import TextFileSource
from maxlm.mesh import build_mesh, logical_rules
from maxlm.train.batch import LmBatch, batch_shardings, global_batch

opened = set()
_read = TextFileSource.__getitem__
def spy(self, i):
    opened.add(self.files[i])
    return _read(self, i)
TextFileSource.__getitem__ = spy  # every document a process reads goes through here

out_dir, steps, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cfg = load_config(resolve_config_path("tiny"), overrides)
n, i = jax.process_count(), jax.process_index()
assert n == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
it = iter(build_dataset(cfg.data, vocab_size=cfg.model.vocab_size, batch_size=cfg.train.global_batch_size // n,
                        seed=cfg.seed, shard_index=i, shard_count=n))
shardings = batch_shardings(LmBatch, build_mesh(cfg), logical_rules(cfg))
batches = []
for _ in range(steps):
    gb = global_batch(LmBatch, next(it), shardings)
    assert gb.inputs.shape == (cfg.train.global_batch_size, cfg.data.seq_len)
    full = multihost_utils.process_allgather(gb, tiled=True)
    batches.append({k: np.asarray(getattr(full, k)).tolist() for k in LmBatch.FIELDS})
it.close()
with open(f"{out_dir}/process{i}.json", "w") as f:
    json.dump({"opened": sorted(opened), "batches": batches}, f)
'''


def test_two_processes_read_disjoint_shards_and_assemble_the_global_batch(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"document {i}: " + " ".join(f"w{(i * j) % 17}" for j in range(5 + i % 9)) + "\n" for i in range(24)]
    for i, d in enumerate(docs):
        (corpus / f"{i:02d}.txt").write_text(d)
    tok = train_tokenizer(str(corpus / "*.txt"), 300, str(tmp_path / "tok.model"))
    overrides = ["data.source=text", f"data.path={corpus}/*.txt", f"data.tokenizer={tok}", "model.vocab_size=300",
                 "data.seq_len=32", "train.global_batch_size=8"]
    (tmp_path / "worker.py").write_text(WORKER)
    launch = LocalLaunch([sys.executable, str(tmp_path / "worker.py"), str(tmp_path), str(STEPS), *overrides], 2, 4,
                         extra_env={"PYTHONPATH": str(ROOT)})
    assert run(launch) == 0
    results = [json.loads((tmp_path / f"process{i}.json").read_text()) for i in range(2)]

    # The single-process view: shard 0's rows, then shard 1's (process 0 owns the first half of the mesh's devices).
    cfg = load_config(resolve_config_path("tiny"), overrides)
    shards = [iter(build_dataset(cfg.data, vocab_size=300, batch_size=4, seed=cfg.seed, shard_index=i,
                                 shard_count=2)) for i in range(2)]
    for step in range(STEPS):
        local = [next(s) for s in shards]
        for key in BATCH_KEYS:
            want = np.concatenate([local[0][key], local[1][key]])
            for r in results:  # every process gathered the same global batch, equal to the single-process one
                np.testing.assert_array_equal(np.asarray(r["batches"][step][key], want.dtype), want)

    opened = [set(r["opened"]) for r in results]
    assert opened[0] and opened[1] and not opened[0] & opened[1]  # neither read the other's documents
    files = sorted(str(p) for p in corpus.glob("*.txt"))
    assert opened[0] <= set(files[0::2]) and opened[1] <= set(files[1::2])
