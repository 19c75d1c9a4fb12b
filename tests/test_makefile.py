"""The Makefile's interpreter choice: by default (`PYTHON=newest`) the newest Python >= 3.12 that runs, else python3;
any other PYTHON= is used as given."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake(path: Path, works: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n" if works else "#!/bin/sh\necho 'pyenv: not activated' >&2\nexit 127\n")
    path.chmod(0o755)


def _chosen(bin_dir: Path, pyenv_root: Path, *args: str, **env: str) -> str:
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYENV_ROOT": str(pyenv_root), "HOME": str(pyenv_root)}
    out = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "python", *args], capture_output=True,
                         text=True, env=base | env, cwd=ROOT, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_newest_working_python_at_least_312(tmp_path: Path) -> None:
    bin_dir, pyenv = tmp_path / "bin", tmp_path / "pyenv"
    _fake(bin_dir / "python3.11", works=True)
    assert _chosen(bin_dir, pyenv) == "python3"  # nothing >= 3.12: fall back
    assert _chosen(bin_dir, pyenv, "PYTHON=newest") == "python3"
    _fake(bin_dir / "python3.12", works=True)
    _fake(bin_dir / "python3.13", works=False)  # a pyenv shim of a version that is installed but not active
    assert _chosen(bin_dir, pyenv) == "python3.12"
    for patch in ("3.13.0", "3.13.10", "3.13.2"):
        _fake(pyenv / "versions" / patch / "bin" / "python3.13", works=True)
    assert _chosen(bin_dir, pyenv) == f"{pyenv}/versions/3.13.10/bin/python3.13"
    assert _chosen(bin_dir, pyenv, "PYTHON=python3.11") == "python3.11"
    assert _chosen(bin_dir, pyenv, "PYTHON=/opt/py/bin/python3") == "/opt/py/bin/python3"
    assert _chosen(bin_dir, pyenv, "PYTHON=newest") == f"{pyenv}/versions/3.13.10/bin/python3.13"
    assert _chosen(bin_dir, pyenv, PYTHON="python3.11") == "python3.11"  # from the environment too
