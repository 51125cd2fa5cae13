"""AdapterStore on a real directory: versions, precedence, deletes, crash leftovers, concurrency."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from server.adapters.ids import InvalidName, check_tenant
from server.adapters.store.store import CONFIG_NAME, DELETED_NAME, TMP_DIR, TRASH_DIR, WEIGHTS_NAME, AdapterStore
from server.adapters.store.store_lock import ADAPTER_LOCKS_DIR
from server.adapters.types import AdapterKey
from server.errors import InvalidRequest, NotFound

SUMMARY = {"type": "lora", "variant": "default", "rank": 4, "target_modules": ["q_proj"]}


def write_adapter(path: Path, payload: bytes = b"weights") -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    (path / WEIGHTS_NAME).write_bytes(payload)


def upload(store: AdapterStore, tenant: str, adapter_id: str, payload: bytes) -> int:
    with store.staging() as staged:
        write_adapter(staged, payload)
        return store.publish(tenant, adapter_id, staged, SUMMARY).ref.key.version


def files_under(root: Path) -> list[str]:
    """Files under `root` but the fixed adapter-lock stripes (created when the store opens, never per adapter)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.parent.name != ADAPTER_LOCKS_DIR)


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


def test_publish_creates_versions_and_record(store: AdapterStore) -> None:
    assert upload(store, "acme", "a1", b"one") == 1
    assert upload(store, "acme", "a1", b"two") == 2
    got = store.get("acme", "a1")
    assert got.ref.key == AdapterKey("acme", "a1", 2)
    assert (got.ref.path / WEIGHTS_NAME).read_bytes() == b"two"
    rec = got.record
    assert rec["sha256"] == hashlib.sha256(b"two").hexdigest()
    assert rec["size_bytes"] == 3 and rec["version"] == 2 and rec["id"] == "a1" and rec["tenant"] == "acme"
    assert rec["type"] == "lora" and rec["rank"] == 4 and rec["created_at"].endswith("Z")
    assert [s.ref.key.adapter_id for s in store.list("acme")] == ["a1"]
    assert store.list("other") == []


def test_loose_files_are_version_one_and_uploads_supersede_them(store: AdapterStore) -> None:
    write_adapter(store.root / "default" / "ex", b"loose")
    ref = store.resolve("default", "ex")
    assert ref.key.version == 1 and ref.path == store.root / "default" / "ex"
    rec = store.get("default", "ex").record
    assert rec["type"] == "lora" and rec["sha256"] == hashlib.sha256(b"loose").hexdigest()
    assert upload(store, "default", "ex", b"new") == 2
    assert store.resolve("default", "ex").path.name == "v000002"


def test_unknown_and_other_tenant_give_the_same_not_found(store: AdapterStore) -> None:
    upload(store, "bob", "secret", b"x")
    with pytest.raises(NotFound) as other:
        store.resolve("alice", "secret")
    with pytest.raises(NotFound) as unknown:
        store.resolve("alice", "nothing")
    assert other.value.message.replace("secret", "X") == unknown.value.message.replace("nothing", "X")


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "/etc", "A", "a" * 65, "a\x00", "ａ", "", ".hidden", "a..b"])
def test_bad_ids_and_tenants_never_become_paths(store: AdapterStore, bad: str) -> None:
    with pytest.raises(InvalidRequest):
        store.resolve("acme", bad)
    with pytest.raises(InvalidName):
        check_tenant(bad)
    with pytest.raises(InvalidRequest), store.staging() as staged:
        write_adapter(staged)
        store.publish("acme", bad, staged, SUMMARY)
    assert files_under(store.root) == []


def test_delete_is_immediate_and_versions_stay_monotonic(store: AdapterStore) -> None:
    write_adapter(store.root / "t" / "a", b"loose")
    upload(store, "t", "a", b"v2")
    keys = store.delete("t", "a")
    assert keys == [AdapterKey("t", "a", 1), AdapterKey("t", "a", 2)]
    with pytest.raises(NotFound):
        store.resolve("t", "a")
    with pytest.raises(NotFound):
        store.delete("t", "a")
    assert store.list() == []
    # A new upload after a delete never reuses a version number (no stale cache hit possible).
    assert upload(store, "t", "a", b"v3") == 3
    store.collect_garbage(lambda key: False)
    assert files_under(store.root / TRASH_DIR) == []


def test_garbage_collection_respects_pins(store: AdapterStore) -> None:
    upload(store, "t", "a", b"v1")
    upload(store, "t", "a", b"v2")
    pinned = {AdapterKey("t", "a", 1)}
    store.collect_garbage(lambda key: key in pinned)
    assert (store.root / "t" / "a" / "v000001").is_dir()
    store.collect_garbage(None)  # no pin information: nothing that may be in use is removed
    assert (store.root / "t" / "a" / "v000001").is_dir()
    pinned.clear()
    store.collect_garbage(lambda key: key in pinned)
    assert not (store.root / "t" / "a" / "v000001").exists()
    assert store.resolve("t", "a").key.version == 2


def test_staging_is_removed_when_not_published(store: AdapterStore) -> None:
    with pytest.raises(RuntimeError), store.staging() as staged:
        write_adapter(staged)
        raise RuntimeError("upload refused")
    assert files_under(store.root) == []


def test_sweep_cleans_crash_leftovers(store: AdapterStore) -> None:
    upload(store, "t", "keep", b"k")
    upload(store, "t", "old", b"1")
    upload(store, "t", "old", b"2")
    write_adapter(store.root / TMP_DIR / "half-written", b"partial")  # upload cut by a crash
    upload(store, "t", "gone", b"g")
    (store.root / "t" / "gone" / DELETED_NAME).write_text("1")  # crash right after the delete committed
    reopened = AdapterStore(store.root)
    reopened.sweep()
    assert [s.ref.key for s in reopened.list()] == [AdapterKey("t", "keep", 1), AdapterKey("t", "old", 2)]
    assert files_under(store.root / TMP_DIR) == []
    assert not (store.root / "t" / "gone" / "v000001").exists()
    assert not (store.root / "t" / "old" / "v000001").exists()


def test_concurrent_publishes_get_distinct_complete_versions(store: AdapterStore) -> None:
    versions: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        v = upload(store, "t", "same", f"payload-{i}".encode())
        with lock:
            versions.append(v)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 13))
    for v in versions:
        vdir = store.root / "t" / "same" / f"v{v:06d}"
        assert (vdir / CONFIG_NAME).is_file() and (vdir / WEIGHTS_NAME).read_bytes().startswith(b"payload-")


def test_deleted_files_go_once_the_last_request_lets_go(store: AdapterStore) -> None:
    import time

    upload(store, "t", "busy", b"v1")
    pinned = {AdapterKey("t", "busy", 1)}
    store.delete("t", "busy")
    store.collect_garbage_soon(lambda key: key in pinned, only=("t", "busy"), retry_s=0.05)
    assert files_under(store.root / TRASH_DIR), "a pinned version must stay while its request runs"
    pinned.clear()  # the request finished
    deadline = time.monotonic() + 10
    while files_under(store.root / TRASH_DIR) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert files_under(store.root / TRASH_DIR) == []


def test_adapter_locks_are_fixed_stripes_that_name_no_adapter(tmp_path: Path) -> None:
    """Per-adapter lock files would outlive deletes and name tenants on disk; stripes are made at open."""
    store = AdapterStore(tmp_path)
    stripes = sorted(p.name for p in (tmp_path / ADAPTER_LOCKS_DIR).iterdir())
    with store.lock("acme", "a"), store.lock("acme", "a"):  # re-entrant for the thread that holds it
        pass
    for n in range(200):  # two ids on one stripe, nested, in one thread: no self-deadlock
        with store.lock("acme", "a"), store.lock("acme", f"b{n}"):
            pass
    assert sorted(p.name for p in (tmp_path / ADAPTER_LOCKS_DIR).iterdir()) == stripes and len(stripes) == 64
