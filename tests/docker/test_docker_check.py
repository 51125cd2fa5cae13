"""docker/check.sh's CPU part, for real: build the CPU image with podman, run it, generate with and
without an uploaded adapter, restart it on the same volumes, check the user and the HEALTHCHECK.

Long (a couple of minutes with pip's local wheels): `make test-long`. It needs root (to install podman,
runc and debootstrap through docker/setup-host.sh) or podman already installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.long


def test_the_cpu_image_builds_serves_and_keeps_an_uploaded_adapter(tmp_path: Path) -> None:
    if shutil.which("podman") is None and os.geteuid() != 0:
        pytest.skip("podman is not installed and only root can install it (docker/setup-host.sh)")
    report = tmp_path / "report.json"
    done = subprocess.run([str(ROOT / "docker" / "check.sh"), "--skip-gpu", "--report", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "PASSED" in done.stderr
    result = json.loads(report.read_text())
    assert {"cpu_build_s", "cpu_image_mb", "cpu_first_start_s", "cpu_restart_s"} <= result.keys()
