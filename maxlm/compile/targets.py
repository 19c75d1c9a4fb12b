"""Accelerators maxlm can compile for without having them: TPU slices and NVIDIA GPU clusters.

A target names the chip and the topology, e.g. `tpu-v5p:4x4x4` (64 v5p chips), `tpu-v6e:16x16`, `h100x64`
(8 hosts of 8 GPUs) or `h100:2x8` (hosts x GPUs per host). `compile_devices` turns it into compile-only
`jax.Device`s through `jax.experimental.topologies.get_topology_desc`, which needs libtpu (`maxlm[tpu-compile]`)
for TPUs and the CUDA plugin plus ptxas (`maxlm[gpu-compile]`) for GPUs; nothing here allocates device memory.

Facts behind the tables: TPU topology names and chip configs are the ones libtpu accepts (measured, see
shared/PLATFORM.md); v4 and v5p run one device per chip in `megacore` mode; HBM per chip is maxlm.flops.HARDWARE.
GPU device descriptions are the numbers of XLA's GpuTargetConfigProto specs (xla/backends/gpu/target_config/specs:
a100_sxm_80, h100_sxm, h200): SM count, shared memory, L2, clocks, memory size and compute capability.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from maxlm.config import ConfigError
from maxlm.flops import HARDWARE

# chip -> (libtpu topology prefix, chip config, dimensions of the topology, extra)
_TPU = {
    "tpu-v4": ("v4", "megacore", 3),
    "tpu-v5p": ("v5", "megacore", 3),
    "tpu-v5e": ("v5e", "default", 2),
    "tpu-v6e": ("v6e", "default", 2),
}
TPU_CHIPS_PER_HOST = 4  # a TPU VM host drives 2x2 chips in multi-host slices
GPUS_PER_HOST = 8

# GpuTargetConfigProto numbers per chip (XLA's target_config specs).
_GPU_INFO: dict[str, dict[str, Any]] = {
    "a100": dict(core_count=108, fpus_per_core=64, shared_memory_per_core=167936, shared_memory_per_block_optin=166912,
                 memory_bandwidth=2039040000000, l2_cache_size=41943040, clock_rate_ghz=1.41,
                 device_memory_size=85100068864, cc=(8, 0), name="NVIDIA A100-SXM4-80GB"),
    "h100": dict(core_count=132, fpus_per_core=128, shared_memory_per_core=233472, shared_memory_per_block_optin=232448,
                 memory_bandwidth=3352320000000, l2_cache_size=52428800, clock_rate_ghz=1.98,
                 device_memory_size=84942979072, cc=(9, 0), name="NVIDIA H100 80GB HBM3"),
    "h200": dict(core_count=132, fpus_per_core=128, shared_memory_per_core=233472, shared_memory_per_block_optin=232448,
                 memory_bandwidth=4800000000000, l2_cache_size=52428800, clock_rate_ghz=1.98,
                 device_memory_size=151397597184, cc=(9, 0), name="NVIDIA H200 141GB HBM3e"),
}

EXAMPLES = "tpu-v5p:4x4x4, tpu-v5e:8x8, tpu-v6e:16x16, tpu-v4:2x2x2, h100x64, a100x8, h200x8, h100:2x8"


@dataclass(frozen=True)
class Target:
    """One compile target: `devices` chips (one jax device each) in `slices` slices / `hosts` hosts."""

    name: str
    platform: str  # "tpu" | "cuda"
    chip: str  # maxlm.flops.HARDWARE key
    topology: str  # libtpu topology name (v5:4x4x4) or GPU partitions x hosts x devices (1x8x8)
    devices: int  # over all slices
    slices: int
    hosts: int  # over all slices
    hbm_bytes: float  # per device

    @property
    def extra(self) -> str:
        return "tpu-compile" if self.platform == "tpu" else "gpu-compile"

    @property
    def devices_per_slice(self) -> int:
        return self.devices // self.slices

    def describe(self) -> str:
        slices = f" x {self.slices} slices" if self.slices > 1 else ""
        return f"{self.name}{slices}: {self.devices} {self.chip} devices on {self.hosts} hosts"


def _dims(text: str, n: int | None, name: str) -> tuple[int, ...]:
    parts = text.split("x")
    if not all(p.isdigit() and int(p) > 0 for p in parts) or (n is not None and len(parts) != n):
        shape = "x".join(["N"] * n) if n else "NxM"
        raise ConfigError(f"--target {name}: topology {text!r} must look like {shape} (e.g. {EXAMPLES})")
    return tuple(int(p) for p in parts)


def parse_target(name: str, slices: int = 1) -> Target:
    """`--target` text -> Target; ConfigError (exit 2) naming the known forms for anything else."""
    if slices < 1:
        raise ConfigError(f"--slices must be >= 1, got {slices}")
    text = name.strip().lower()
    chip, _, topo = text.partition(":")
    if chip in _TPU:
        prefix, _, ndim = _TPU[chip]
        dims = _dims(topo, ndim, name)
        chips = math.prod(dims)
        hosts = max(1, chips // TPU_CHIPS_PER_HOST) * slices
        return Target(name, "tpu", chip, f"{prefix}:{topo}", chips * slices, slices, hosts, HARDWARE[chip].hbm_bytes)
    m = re.fullmatch(r"([a-z]\d+)(?:x(\d+)|:(\d+)x(\d+))", text)
    if m and m.group(1) in _GPU_INFO:
        gpu = m.group(1)
        if m.group(2):
            n = int(m.group(2))
            per = min(n, GPUS_PER_HOST)
            if n % per:
                raise ConfigError(f"--target {name}: {n} GPUs do not fill hosts of {GPUS_PER_HOST}; use "
                                  f"{gpu}:HOSTSxGPUS (e.g. {gpu}:2x4)")
            hosts = n // per
        else:
            hosts, per = int(m.group(3)), int(m.group(4))
            if not hosts or not per:
                raise ConfigError(f"--target {name}: hosts and GPUs per host must be positive")
        if slices > 1:
            raise ConfigError(f"--slices applies to TPU targets; for {gpu} put every host into the target "
                              f"({gpu}:HOSTSxGPUS)")
        return Target(name, "cuda", gpu, f"1x{hosts}x{per}", hosts * per, 1, hosts, HARDWARE[gpu].hbm_bytes)
    raise ConfigError(f"--target {name!r} is not a known target; use a TPU slice (tpu-v4, tpu-v5p: AxBxC; tpu-v5e, "
                      f"tpu-v6e: AxB) or a GPU cluster (a100, h100, h200: xN or :HOSTSxGPUS), e.g. {EXAMPLES}")


def gpu_target_config(chip: str) -> str:
    """The GpuTargetConfigProto text XLA compiles against for `chip` (fields jax 0.10's plugin accepts)."""
    g = _GPU_INFO[chip]
    major, minor = g["cc"]
    fields = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
                  shared_memory_per_core=g["shared_memory_per_core"], threads_per_core_limit=2048,
                  core_count=g["core_count"], fpus_per_core=g["fpus_per_core"], block_dim_limit_x=2147483647,
                  block_dim_limit_y=65535, block_dim_limit_z=65535, memory_bandwidth=g["memory_bandwidth"],
                  l2_cache_size=g["l2_cache_size"], clock_rate_ghz=g["clock_rate_ghz"],
                  device_memory_size=g["device_memory_size"],
                  shared_memory_per_block_optin=g["shared_memory_per_block_optin"])
    lines = [f"  {k}: {v}" for k, v in fields.items()]
    lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}", "  registers_per_core_limit: 65536",
              "  registers_per_block_limit: 65536"]
    return ("gpu_device_info {\n" + "\n".join(lines) + "\n}\nplatform_name: \"CUDA\"\n"
            "dnn_version_info { major: 9 minor: 1 }\n" f"device_description_str: \"{g['name']}\"\n")


class MissingExtra(ConfigError):
    """The optional dependency for this target is not installed (the CLI prints one line, exit 2)."""


def _quiet_libtpu() -> None:
    """libtpu looks for TPU metadata and peers at import; on a machine without TPUs that is only noise."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes a machine-wide lock meant for real chips; compile-only use must not block a second compile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _cuda_data_dir() -> str | None:
    """Where ptxas and libdevice live: the nvidia-cuda-nvcc wheel of `maxlm[gpu-compile]`, else CUDA on PATH."""
    try:
        import nvidia.cuda_nvcc as nvcc  # type: ignore[import-not-found]

        root = os.path.dirname(nvcc.__file__) if getattr(nvcc, "__file__", None) else list(nvcc.__path__)[0]
        if os.path.isfile(os.path.join(root, "bin", "ptxas")):
            return root
    except ImportError:
        pass
    import shutil

    ptxas = shutil.which("ptxas")
    return os.path.dirname(os.path.dirname(os.path.realpath(ptxas))) if ptxas else None


def compile_devices(target: Target) -> list[Any]:
    """Compile-only devices of the target, in the order its mesh is built from. Raises MissingExtra."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        import importlib.util

        if importlib.util.find_spec("libtpu") is None:
            raise MissingExtra(f"compiling for {target.chip} needs libtpu: pip install 'maxlm[tpu-compile]'")
        _quiet_libtpu()
        _, chip_config, ndim = _TPU[target.chip]
        bounds = (2, 2, 1) if ndim == 3 else (min(2, _first(target.topology)), 2, 1)
        desc = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                            chip_config_name=chip_config, chips_per_host_bounds=bounds,
                                            num_slices=target.slices)
    else:
        try:
            import importlib.util

            if not any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)):
                raise ImportError
        except ImportError:
            raise MissingExtra(f"compiling for {target.chip} needs the JAX CUDA plugin: pip install "
                               "'maxlm[gpu-compile]'") from None
        cuda_dir = _cuda_data_dir()
        if cuda_dir is None:
            raise MissingExtra(f"compiling for {target.chip} needs ptxas: pip install 'maxlm[gpu-compile]'")
        flag = f"--xla_gpu_cuda_data_dir={cuda_dir}"
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        desc = topologies.get_topology_desc(platform="cuda", topology_name="", target_config=gpu_target_config(
            target.chip), topology=target.topology)
    devices = list(desc.devices)
    if len(devices) != target.devices:
        raise ConfigError(f"--target {target.name}: libtpu/XLA describes {len(devices)} devices, expected "
                          f"{target.devices}")
    return devices


def _first(topology: str) -> int:
    return int(topology.split(":")[1].split("x")[0])


def target_for(hardware: str, chips: int) -> str:
    """The `--target` for a planner request (`--hardware NAME --chips K`): the most compact slice shape for TPUs,
    hosts of 8 for GPUs. ConfigError when no slice of that size exists."""
    if hardware in _TPU:
        ndim = _TPU[hardware][2]
        dims = [1] * ndim
        n, i = chips, 0
        while n > 1 and n % 2 == 0:  # grow the smallest dimension: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...
            dims[i % ndim] *= 2
            n //= 2
            i += 1
        if n != 1 or chips < 4:
            raise ConfigError(f"--chips {chips}: {hardware} slices come in powers of two of at least 4 chips")
        dims = sorted(dims)
        if ndim == 3 and dims[0] == 1:
            dims = [dims[1], dims[2], 1]
        return f"{hardware}:{'x'.join(map(str, dims))}"
    if hardware in _GPU_INFO:
        return f"{hardware}x{chips}"
    raise ConfigError(f"--verify cannot compile for {hardware}: no compile target (targets: {EXAMPLES})")
