"""The client must work without the server's stack: importing it loads no server, torch or FastAPI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT

CHECK = """
import sys
import client, client.cli, client.cli_commands
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'server', 'torch', 'transformers', 'fastapi', 'pydantic'})
assert not heavy, heavy
print('ok')
"""


def test_client_imports_only_httpx_and_stdlib() -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_installed_loraplex_command_runs_client_commands(tmp_path: Path) -> None:
    """Outside the repo (installed package, not the source tree on sys.path): `loraplex jobs --help`."""
    exe = shutil.which("loraplex", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the package is not installed in this environment (run `make setup`)")
    result = subprocess.run([exe, "jobs", "list", "--url", "http://127.0.0.1:9"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr  # cannot connect, reported cleanly
    assert "is the server running at http://127.0.0.1:9" in result.stderr
