"""The board's views: readiness means every replica; metrics carry a replica label and tenant scoping."""

from __future__ import annotations

import time

from server.cluster.board import STALE_AFTER_S, Board, Post, readiness, render_metrics

TEXT = """# HELP loraplex_requests_total Requests
# TYPE loraplex_requests_total counter
loraplex_requests_total{tenant="alice"} 3.0
loraplex_requests_total{tenant="bob"} 1.0
# HELP loraplex_engine_alive Engine
# TYPE loraplex_engine_alive gauge
loraplex_engine_alive 1.0
"""


def post(replica: str, ready: bool = True, reason: str = "") -> Post:
    return Post(replica, ready, reason, TEXT, time.monotonic())


def test_ready_only_when_every_wanted_replica_is():
    assert readiness([post("a"), post("b")], 2) == (True, "")
    ok, why = readiness([post("a"), post("b", False, "shutting down")], 2)
    assert not ok and why == "1 of 2 replicas ready (shutting down)"
    assert not readiness([post("a")], 2)[0]


def test_stale_posts_drop_out():
    board = Board()
    board.post("a", True, "", TEXT)
    board.post("b", True, "", TEXT)
    board._posts["b"] = Post("b", True, "", TEXT, time.monotonic() - STALE_AFTER_S - 1)
    assert [p.replica for p in board.fresh()] == ["a"]
    board.leave("a")
    assert board.fresh() == []


def test_metrics_are_labelled_by_replica_and_scoped_to_a_tenant():
    everything = render_metrics([post("a"), post("b")], None).decode()
    assert 'loraplex_requests_total{replica="a",tenant="alice"} 3.0' in everything
    assert 'loraplex_requests_total{replica="b",tenant="bob"} 1.0' in everything
    alice = render_metrics([post("a"), post("b")], "alice").decode()
    assert 'tenant="bob"' not in alice and alice.count('tenant="alice"') == 2
    assert 'loraplex_engine_alive{replica="a"} 1.0' in alice
