"""The client must work without the server's stack: importing it loads no server, torch or FastAPI."""

from __future__ import annotations

import subprocess
import sys

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
