"""What a newcomer meets: one version, `pcd --version`, `python -m pcd`, a light `import pcd`, and the README's
install command keeping the torch an environment already has."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

import pcd

REPO = Path(__file__).resolve().parents[1]
NETWORK_FAILURES = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                    "No matching distribution found", "Could not find a version")


def test_one_version_everywhere() -> None:
    assert pcd.__version__ == importlib.metadata.version("pcd-distill")
    for command in ([sys.executable, "-m", "pcd", "--version"], [sys.executable, "-m", "pcd.cli", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["pcd", pcd.__version__]


def test_python_m_pcd_is_the_command_line() -> None:
    result = subprocess.run([sys.executable, "-m", "pcd", "generate-scenes", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--frames" in result.stdout


def test_importing_pcd_and_stage_one_imports_no_torch() -> None:
    probe = ("import sys, pcd, pcd.cli, pcd.pipeline.extract, pcd.pipeline.synthetic; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'open_clip'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_readme_install_command_keeps_the_installed_torch(tmp_path: Path) -> None:
    """The README's command for an environment that already has a torch, as a dry run (no wheel is
    downloaded): the constraints file pins that torch, so the resolution installs no other one."""
    readme = (REPO / "README.md").read_text()
    pin = "python -c 'import torch; print(\"torch==\" + torch.__version__)' > constraints.txt"
    assert pin in readme and "pip install -c constraints.txt -e ." in readme
    constraints = tmp_path / "constraints.txt"
    subprocess.run(pin.replace("python", sys.executable, 1).replace("constraints.txt", str(constraints)),
                   shell=True, check=True, timeout=120)
    import torch

    assert constraints.read_text().strip() == f"torch=={torch.__version__}"
    report = tmp_path / "report.json"
    # --no-build-isolation: pcd's metadata is built with the setuptools already here, not one fetched from PyPI
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                             "--no-build-isolation", "-c", str(constraints), "-e", str(REPO)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and any(failure in result.stderr for failure in NETWORK_FAILURES):
        pytest.skip(f"PyPI is not reachable and a dependency is not installed here: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "pcd-distill" in planned
    assert planned.get("torch", torch.__version__) == torch.__version__, planned
