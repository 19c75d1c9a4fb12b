"""Every file in launch/ exercised as far as a machine without a cluster allows: each script's DRY_RUN=1 mode
prints the command it would run, and the GKE manifest is a JobSet whose pods match its TPU topology and run
`maxlm train`. Each also points at the `maxlm compile` check to run first."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"


def _dry(script: str, *args: str) -> str:
    env = os.environ | {"DRY_RUN": "1", "MAXLM_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_every_launch_file_documents_the_compile_check() -> None:
    for f in LAUNCH.iterdir():
        assert "maxlm compile" in f.read_text(), f"{f.name} does not mention `maxlm compile`"


def test_tpu_pod_prints_the_gcloud_command() -> None:
    out = _dry("tpu_pod.sh", "my-tpu", "us-east5-a", "llama3-8b", "run_dir=gs://b/r")
    assert out.startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone us-east5-a --worker=all")
    assert "MAXLM_DISTRIBUTED=1" in out and "maxlm\\ train\\ llama3-8b\\ run_dir=gs://b/r" in out


def test_slurm_prints_the_srun_command() -> None:
    assert _dry("slurm.sbatch", "llama3-8b", "mesh.fsdp=-1").strip() == \
        "srun --kill-on-bad-exit=1 .venv/bin/maxlm train llama3-8b mesh.fsdp=-1"


def test_local_prints_one_command_per_process() -> None:
    lines = _dry("local_multiprocess.sh", "2", "4", "train", "tiny", "train.steps=3").strip().splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert f"MAXLM_PROCESS_ID={i}" in line and "MAXLM_NUM_PROCESSES=2" in line
        assert "--xla_force_host_platform_device_count=4" in line and line.endswith("train tiny train.steps=3 &")


def test_gke_jobset_matches_its_topology() -> None:
    doc = yaml.safe_load((LAUNCH / "gke_jobset.yaml").read_text())
    assert doc["apiVersion"].startswith("jobset.x-k8s.io/") and doc["kind"] == "JobSet"
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    chips = math.prod(int(x) for x in pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"].split("x"))
    container = pod["containers"][0]
    per_host = int(container["resources"]["limits"]["google.com/tpu"])
    assert job["parallelism"] == job["completions"] == chips // per_host  # one pod per TPU VM host
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] > 0
    assert container["command"][:2] == ["maxlm", "train"]
    assert {"name": "MAXLM_DISTRIBUTED", "value": "1"} in container["env"]
