"""Eight fake CPU devices for every test: must run before jax is imported anywhere.

A persistent XLA compilation cache private to this session lets the many small runs (and the CLI subprocesses)
that compile the same tiny step reuse one executable.
"""

import os
import shutil
import tempfile

# The suite compiles hundreds of tiny programs whose run time is negligible: LLVM's optimisation level 0 (and none of
# its expensive passes) cuts XLA:CPU compile time by about a quarter. Subprocesses inherit these flags.
COMPILE_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
                           + COMPILE_FAST).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Made once, by the process that starts the session (pytest-xdist's workers and the CLI subprocesses inherit it),
# and removed when that session ends.
OWN_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    OWN_CACHE_DIR = tempfile.mkdtemp(prefix="maxlm-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = OWN_CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# `make test` runs `pytest -n auto --dist worksteal`: each worker starts on a contiguous share of the items in
# collection order and idle workers take the tail of the others' shares. The files holding end-to-end runs (largest
# first, as measured) are collected first, so they start at once and the light files fill the gaps at the end.
HEAVY_FIRST = ("test_stdlib.py", "test_dpo.py", "test_launch_local.py", "test_train.py", "test_lora_preference.py",
               "test_moe.py", "test_memory_calibration.py", "test_lora.py", "test_checkpoint.py", "test_lora_moe.py",
               "test_eval.py", "test_generate.py", "test_sft_train.py", "test_data_cli.py", "test_cli.py",
               "test_lora_peft.py", "test_bad_inputs.py", "test_reward.py", "test_convert_mixtral.py", "test_model.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))


def pytest_sessionfinish(session, exitstatus) -> None:
    if OWN_CACHE_DIR is not None and not hasattr(session.config, "workerinput"):
        shutil.rmtree(OWN_CACHE_DIR, ignore_errors=True)
