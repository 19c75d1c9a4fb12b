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
