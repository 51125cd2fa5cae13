"""docker/check.sh's CPU part: the CPU image built and run for real with podman.

Long (about 6 minutes: a build, a first start that converts the model, a restart).
Skips only where podman cannot be had: not installed and no root apt-get to install it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def podman_unavailable() -> str | None:
    if shutil.which("podman") and shutil.which("runc"):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "podman/runc not installed and no root apt-get to install them (docker/setup-host.sh)"
    return None


@pytest.mark.long
@pytest.mark.timeout(3600)
def test_cpu_image_builds_serves_and_keeps_adapters(tmp_path: Path) -> None:
    if reason := podman_unavailable():
        pytest.skip(reason)
    report = tmp_path / "report.json"
    run = subprocess.run([str(ROOT / "docker" / "check.sh"), "--skip-gpu", "--report", str(report)],
                         capture_output=True, text=True, timeout=3300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(report.read_text())
    assert int(result["cpu_first_start_s"]) > 0 and int(result["cpu_image_mb"]) > 0
