"""A flood from tenant A against tenant B's short requests, over real HTTP on a server process of its own
(the load generator must not share the server's GIL). Bounded: 40 requests of 64 tokens on the tiny model,
a few seconds per server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.fairness import Flood, FloodResult, keys_file, preemptions, run_flood
from bench.load import percentile
from tests.harness import spawn_server

FLOOD = Flood(heavy_requests=40, heavy_tokens=64, light_requests=7, timeout_s=90.0)


def flood(model: Path, tmp: Path, fair: bool, heavy_cap: int | None,
          preemption: bool = True) -> tuple[FloodResult, int]:
    """B's latencies, and how many of A's sequences the server preempted."""
    keys = keys_file(tmp / "keys.json", heavy_cap)
    args = ["--model", str(model), "--store", str(tmp / "store"), "--device", "cpu", "--dtype", "float32",
            "--max-batch", "8", "--api-keys", str(keys)]
    env = {"LORAPLEX_FAIR_SCHEDULING": str(fair).lower(), "LORAPLEX_PREEMPTION": str(preemption).lower()}
    with spawn_server(args, env=env) as (_, url):
        result = asyncio.run(run_flood(url, FLOOD))
        preempted = preemptions(url)
    assert result.heavy_ok == FLOOD.heavy_requests  # the flood itself is served, not refused
    assert result.heavy_texts == 1  # 40 identical greedy requests, some preempted and resumed: one answer
    return result, preempted


@pytest.mark.long
def test_capped_flood_keeps_the_light_tenants_ttft_within_2x_idle(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A may hold 2 of the 8 rows (its max_concurrent); the rest of its flood waits in order while B's requests
    find a row at once: B's p50 TTFT stays within 2x its idle p50 (what is left is the busier steps).

    In `make test-long` (a timing bound; bench/NOTES.md "Two-tenant flood" has the readings)."""
    result, _ = flood(tiny_model_dir, tmp_path, fair=True, heavy_cap=2)
    assert result.ratio <= 2.0, result.row()


def test_a_capped_tenant_leaves_rows_for_the_light_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The capped flood in the default suite, asserting what is not a matter of timing: B finds a free row
    (nothing is preempted) and its p50 is a few steps, not a share of A's flood."""
    result, preempted = flood(tiny_model_dir, tmp_path, fair=True, heavy_cap=2)
    assert preempted == 0
    assert percentile(result.loaded_ttft_s, 50) < result.heavy_s / 10, result.row()


@pytest.mark.long
def test_uncapped_flood_keeps_the_light_tenants_ttft_within_2x_idle(tiny_model_dir: Path, tmp_path: Path) -> None:
    """No cap: A fills all 8 rows. B is below its share (4 of 8 with two tenants active), so each of its
    requests preempts A's youngest running sequence instead of waiting for one of A's to end, and stops
    the step in flight at its next layer.

    In `make test-long` (a timing bound; bench/NOTES.md "Two-tenant flood" has the readings)."""
    result, preempted = flood(tiny_model_dir, tmp_path, fair=True, heavy_cap=None)
    assert preempted > 0  # loraplex_tenant_preemptions_total{tenant="heavy"}
    assert result.ratio <= 2.0, result.row()


def test_preemption_serves_the_light_tenant_at_once_in_an_uncapped_flood(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    """The uncapped flood in the default suite, asserting what is not a matter of timing: A's sequences were
    preempted for B, A's preempted-and-resumed answers are all one text (checked in `flood`), and B's p50
    stays within a few A steps, far below the tens of steps it waits with preemption off."""
    result, preempted = flood(tiny_model_dir, tmp_path, fair=True, heavy_cap=None)
    assert preempted > 0
    assert percentile(result.loaded_ttft_s, 50) < result.heavy_s / 10, result.row()


def test_fair_admission_serves_the_light_tenant_before_the_heavy_backlog(tiny_model_dir: Path,
                                                                        tmp_path: Path) -> None:
    """No cap, no preemption: the batch is full of A. FIFO makes B wait for A's whole backlog; the virtual token
    counter gives B the next row that frees (B has received the least), so B waits for about one A request, not
    forty."""
    fifo, _ = flood(tiny_model_dir, tmp_path / "fifo", fair=False, heavy_cap=None)
    fair, preempted = flood(tiny_model_dir, tmp_path / "fair", fair=True, heavy_cap=None, preemption=False)
    assert preempted == 0  # preemption off: B waits for a row to free, as before
    fifo_p50, fair_p50 = percentile(fifo.loaded_ttft_s, 50), percentile(fair.loaded_ttft_s, 50)
    assert fair_p50 * 3 < fifo_p50, (fair.row(), fifo.row())
    assert fair_p50 < fair.heavy_s / 3, fair.row()  # a fraction of the flood, not its length


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    (tmp_path / "fifo").mkdir()
    (tmp_path / "fair").mkdir()
    return tmp_path
