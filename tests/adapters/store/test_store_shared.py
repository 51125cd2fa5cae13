"""One store directory under several processes of one cluster: locks, version numbers, GC grace."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from server.adapters.store.store import TMP_DIR, AdapterStore, open_store
from server.adapters.store.store_lock import StoreInUse, acquire_store_lock
from tests.adapters.store.test_store import upload


def test_shared_holders_coexist_and_exclude_a_single_server(tmp_path):
    first, second = acquire_store_lock(tmp_path, shared=True), None
    try:
        with pytest.raises(StoreInUse, match="server or cluster"):
            acquire_store_lock(tmp_path)
        first()
        single = acquire_store_lock(tmp_path)
        with pytest.raises(StoreInUse):
            second = acquire_store_lock(tmp_path, shared=True)
        single()
    finally:
        first()
        if second is not None:
            second()


def _publish_many(root: str, count: int, out: "multiprocessing.Queue[list[int]]") -> None:
    store = AdapterStore(Path(root), shared_grace_s=60.0)
    out.put([upload(store, "acme", "busy", os.urandom(64)) for _ in range(count)])


def test_two_processes_publishing_one_adapter_get_distinct_versions(tmp_path):
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_publish_many, args=(str(tmp_path), 8, out)) for _ in range(2)]
    for p in procs:
        p.start()
    versions = out.get(timeout=60) + out.get(timeout=60)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(versions) == list(range(1, 17))


def test_shared_store_keeps_a_superseded_version_through_the_grace_period(tmp_path):
    store = AdapterStore(tmp_path, shared_grace_s=60.0)
    upload(store, "acme", "a", b"one")
    v1 = store.resolve("acme", "a").path
    upload(store, "acme", "a", b"two")
    assert store.collect_garbage(lambda key: False) == 1  # another replica may have resolved v1 just now
    assert v1.is_dir()
    store.shared_grace_s = 0.0  # the grace period has passed
    assert store.collect_garbage(lambda key: False) == 0 and not v1.exists()


def test_shared_store_keeps_trash_through_the_grace_period(tmp_path):
    store = AdapterStore(tmp_path, shared_grace_s=60.0)
    upload(store, "acme", "a", b"one")
    store.delete("acme", "a")
    assert store.collect_garbage(lambda key: False) == 1 and len(list((tmp_path / ".trash").iterdir())) == 1
    store.shared_grace_s = 0.0
    assert store.collect_garbage(lambda key: False) == 0 and not list((tmp_path / ".trash").iterdir())


def test_a_replica_opening_the_store_does_not_sweep_another_ones_upload(tmp_path):
    staging = tmp_path / TMP_DIR / "in-flight"
    staging.mkdir(parents=True)
    store = open_store(tmp_path, shared_grace_s=60.0)
    assert staging.is_dir()  # another replica is writing it
    store.close()
    open_store(tmp_path).close()  # a single server owns the store: leftovers of a crash go
    assert not staging.exists()
