"""The cluster's driver refuses a store another server holds, before Ray starts, in one line."""

from __future__ import annotations

import subprocess

import pytest

from server.adapters.store.store_lock import acquire_store_lock
from tests.harness import REPO_ROOT, serve_command

pytest.importorskip("ray")


def test_a_cluster_on_a_single_servers_store_is_refused(tmp_path):
    release = acquire_store_lock(tmp_path)  # a single server owns it
    try:
        done = subprocess.run(serve_command(["--replicas", "2", "--store", str(tmp_path), "--device", "cpu"]),
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    finally:
        release()
    assert done.returncode == 1 and "in use by another loraplex server or cluster" in done.stderr
    assert "Traceback" not in done.stderr and "Started a local Ray instance" not in done.stderr
