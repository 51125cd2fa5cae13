"""The bench's server command line: tuned sizes for the shared server, nothing for the defaults row."""

from __future__ import annotations

from pathlib import Path

from bench.config import BenchConfig
from bench.process import server_args


def test_a_plain_server_gets_no_sizing_flag():
    args = server_args(BenchConfig(), Path("s"), 8123, max_batch=None, resident=None)
    assert args == ["--store", "s", "--host", "127.0.0.1", "--port", "8123"]


def test_the_shared_server_gets_its_sizes():
    args = server_args(BenchConfig(), Path("s"), 8123, max_batch=32, resident=40)
    assert args[args.index("--max-batch") + 1] == "32" and args[args.index("--max-adapters-resident") + 1] == "40"
