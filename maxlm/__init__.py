"""maxlm: train LLMs end to end in JAX/Flax."""

import os as _os
import re as _re

__version__ = "0.1.0"


def apply_fake_cpu_mesh_flags() -> None:
    """Keep XLA:CPU's collectives in program order on a fake multi-device CPU mesh.

    With `--xla_force_host_platform_device_count=N` every fake device runs the same program on its own thread. On
    jaxlib 0.12 the concurrency-optimised scheduler lets independent collectives of different replica groups
    (e.g. an FSDP all-gather and a tensor-axis all-reduce inside the gradient-accumulation scan) start in different
    orders on different devices, and the rendezvous then waits forever (XLA aborts after its timeout). The default
    scheduler keeps them in one order. Only the host platform is affected, and only before jax initialises its
    backend, which is why this runs at `import maxlm`. Set the flag yourself to override.
    """
    flags = _os.environ.get("XLA_FLAGS", "")
    m = _re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if m and int(m.group(1)) > 1 and "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        _os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_enable_concurrency_optimized_scheduler=false".strip()


apply_fake_cpu_mesh_flags()


def skip_absent_tpu() -> None:
    """With libtpu installed (`maxlm[tpu-compile]`) but no TPU attached, jax would probe for one at startup and
    print libtpu's initialisation errors on every command. When the machine has no TPU device files, leave the
    TPU backend out (JAX_PLATFORMS) unless the user chose the platforms already. Compiling for a TPU target needs
    no TPU backend: `maxlm compile` builds compile-only devices from libtpu directly."""
    import importlib.util
    from glob import glob

    if _os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if glob("/dev/accel*") or glob("/dev/vfio/[0-9]*"):
        return  # a TPU VM: let jax find its chips
    _os.environ["JAX_PLATFORMS"] = "cuda,cpu" if glob("/dev/nvidia[0-9]*") else "cpu"


skip_absent_tpu()
