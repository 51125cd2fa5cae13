"""S3AdapterStore against a real S3-compatible server (moto on loopback): versions, sharing, checksums,
races between writers and readers, outages, and the local cache's bound."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from server.adapters.store.object_store import ObjectStore, S3Location, S3Options
from server.adapters.store.s3_store import S3AdapterStore, open_s3_store
from server.adapters.store.version_cache import VersionCache
from server.adapters.store.store import CONFIG_NAME, WEIGHTS_NAME
from server.adapters.types import AdapterKey
from server.errors import InvalidRequest, NotFound, StoreUnavailable
from tests.adapters.store.s3_moto import MotoS3, moto_s3

SUMMARY = {"type": "lora", "variant": "default", "rank": 4, "target_modules": ["q_proj"]}
MiB = 1 << 20


def write_adapter(path: Path, payload: bytes, tag: int = 0) -> None:
    """A config and weights that name each other (`tag`), so a reader can tell a mix of two versions."""
    (path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
                                                "tag": tag}))
    (path / WEIGHTS_NAME).write_bytes(payload)


def upload(store: S3AdapterStore, tenant: str, adapter_id: str, payload: bytes, tag: int = 0) -> int:
    with store.staging() as staged:
        write_adapter(staged, payload, tag)
        return store.publish(tenant, adapter_id, staged, SUMMARY).ref.key.version


def open_on(options: S3Options, root: Path, cache_bytes: int = 64 * MiB, min_age_s: float = 0.0) -> S3AdapterStore:
    return open_s3_store(options, root, cache_bytes, min_age_s)


def version_objects(moto: MotoS3, options: S3Options) -> list[str]:
    listed = moto.client().list_objects_v2(Bucket=options.location.bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []) if "/v0" in o["Key"])


@pytest.fixture
def options(moto: MotoS3) -> S3Options:
    return moto.new_bucket()


@pytest.fixture
def store(options: S3Options, tmp_path: Path) -> S3AdapterStore:
    return open_on(options, tmp_path / "server-a")


@pytest.fixture
def other(options: S3Options, tmp_path: Path) -> S3AdapterStore:
    """A second server on the same bucket, with its own local cache."""
    return open_on(options, tmp_path / "server-b")


def test_location_parses_bucket_and_prefix() -> None:
    assert S3Location.parse("s3://my-bucket/a/b/") == S3Location("my-bucket", "a/b")
    assert S3Location.parse("s3://my-bucket") == S3Location("my-bucket", "")
    assert S3Location("b", "p").key("acme", "a1") == "p/acme/a1"
    for bad in ("my-bucket/x", "s3://", "s3://UPPER/x", "s3://b/../x", "http://b/x"):
        with pytest.raises(ValueError):
            S3Location.parse(bad)


def test_publish_resolve_list_delete_versions(store: S3AdapterStore) -> None:
    assert upload(store, "acme", "a1", b"one") == 1
    assert upload(store, "acme", "a1", b"two") == 2
    ref = store.resolve("acme", "a1")
    assert ref.key == AdapterKey("acme", "a1", 2) and (ref.path / WEIGHTS_NAME).read_bytes() == b"two"
    rec = store.get("acme", "a1").record
    assert rec["sha256"] == hashlib.sha256(b"two").hexdigest() and rec["size_bytes"] == 3
    assert rec["version"] == 2 and rec["id"] == "a1" and rec["tenant"] == "acme" and rec["type"] == "lora"
    upload(store, "bob", "b1", b"bob's")
    assert store.tenants() == ["acme", "bob"]
    assert [s.ref.key.adapter_id for s in store.list("acme")] == ["a1"]
    assert sorted(s.ref.key.tenant for s in store.list()) == ["acme", "bob"]
    assert store.adapter_ids("nobody") == []
    assert store.delete("acme", "a1") == [AdapterKey("acme", "a1", 2)]
    for call in (store.resolve, store.get, store.delete):
        with pytest.raises(NotFound):
            call("acme", "a1")
    assert store.adapter_ids("acme") == []
    assert upload(store, "acme", "a1", b"three") == 3, "versions keep growing across a delete"
    assert (store.resolve("acme", "a1").path / WEIGHTS_NAME).read_bytes() == b"three"


def test_other_tenant_and_unknown_give_the_same_not_found(store: S3AdapterStore) -> None:
    upload(store, "bob", "secret", b"x")
    with pytest.raises(NotFound) as other:
        store.resolve("alice", "secret")
    with pytest.raises(NotFound) as unknown:
        store.resolve("alice", "nothing")
    assert other.value.message.replace("secret", "X") == unknown.value.message.replace("nothing", "X")
    for bad in ("..", "a/b", "A", ""):
        with pytest.raises(InvalidRequest):
            store.resolve("acme", bad)


def test_an_upload_through_one_server_is_served_by_the_other_at_once(store: S3AdapterStore,
                                                                      other: S3AdapterStore) -> None:
    upload(store, "acme", "a1", b"v1")
    assert (other.resolve("acme", "a1").path / WEIGHTS_NAME).read_bytes() == b"v1"
    upload(store, "acme", "a1", b"v2")
    assert (other.resolve("acme", "a1").path / WEIGHTS_NAME).read_bytes() == b"v2"
    store.delete("acme", "a1")
    with pytest.raises(NotFound):
        other.resolve("acme", "a1")
    assert upload(other, "acme", "a1", b"v3") == 3, "the other server numbers after the shared pointer"


def test_a_number_claimed_by_another_publisher_is_skipped(moto: MotoS3, options: S3Options,
                                                          store: S3AdapterStore, other: S3AdapterStore) -> None:
    """Another server's publish in flight holds v2 (its record object exists, its pointer swap is to come)."""
    upload(store, "acme", "a1", b"one")
    claim = f"{options.location.key('acme', 'a1')}/v000002/loraplex_record.json"
    moto.client().put_object(Bucket=options.location.bucket, Key=claim, Body=b"{}")
    assert upload(store, "acme", "a1", b"three") == 3
    assert (other.resolve("acme", "a1").path / WEIGHTS_NAME).read_bytes() == b"three"


def test_a_stale_pointer_swap_loses(store: S3AdapterStore, other: S3AdapterStore) -> None:
    """The commit is a compare-and-swap: a publisher whose pointer read is stale never moves it back."""
    upload(store, "acme", "a1", b"one")
    stale, etag = store._read_pointer("acme", "a1")
    upload(other, "acme", "a1", b"two")
    assert not store._swap("acme", "a1", stale, etag)
    assert store.resolve("acme", "a1").key.version == 2


def test_superseded_and_deleted_versions_leave_the_bucket(moto: MotoS3, options: S3Options,
                                                          store: S3AdapterStore) -> None:
    upload(store, "acme", "a1", b"one")
    upload(store, "acme", "a1", b"two")
    pinned = {AdapterKey("acme", "a1", 1)}
    store.collect_garbage(lambda key: key in pinned, only=("acme", "a1"))
    assert all("/v000002/" in k for k in version_objects(moto, options))
    assert store.cache.versions("acme", "a1") == {1, 2}, "a pinned local copy stays"
    pinned.clear()
    assert store.collect_garbage(lambda key: False) == 0
    assert store.cache.versions("acme", "a1") == {2}
    store.delete("acme", "a1")
    store.collect_garbage(lambda key: False, only=("acme", "a1"))
    assert version_objects(moto, options) == [] and store.cache.versions("acme", "a1") == set()


def test_checksum_mismatch_is_refused(moto: MotoS3, options: S3Options, store: S3AdapterStore,
                                      other: S3AdapterStore) -> None:
    upload(store, "acme", "a1", b"the real weights")
    key = f"{options.location.key('acme', 'a1')}/v000001/{WEIGHTS_NAME}"
    moto.client().put_object(Bucket=options.location.bucket, Key=key, Body=b"the fake weights")
    with pytest.raises(StoreUnavailable, match="checksum"):
        other.resolve("acme", "a1")
    assert other.cache.versions("acme", "a1") == set(), "nothing unverified is kept"


def test_a_corrupt_pointer_refuses_its_adapter_only(moto: MotoS3, options: S3Options, store: S3AdapterStore) -> None:
    upload(store, "acme", "good", b"x")
    upload(store, "acme", "bad", b"y")
    key = f"{options.location.key('acme', 'bad')}/pointer.json"
    moto.client().put_object(Bucket=options.location.bucket, Key=key, Body=b"{not json")
    with pytest.raises(StoreUnavailable, match="repair"):
        store.resolve("acme", "bad")
    assert store.adapter_ids("acme") == ["good"]


def test_markers_are_shared(store: S3AdapterStore, other: S3AdapterStore) -> None:
    upload(store, "acme", "a1", b"x")
    assert not other.has_marker("acme", "a1", ".merged")
    store.set_marker("acme", "a1", ".merged", True)
    assert other.has_marker("acme", "a1", ".merged")
    other.set_marker("acme", "a1", ".merged", False)
    assert not store.has_marker("acme", "a1", ".merged")
    with pytest.raises(ValueError):
        store.set_marker("acme", "a1", "pointer.json", True)


def test_readers_never_see_a_mix_of_two_versions(store: S3AdapterStore, other: S3AdapterStore) -> None:
    """One server re-uploads and deletes while the other resolves and reads: every read is one whole version."""
    upload(store, "acme", "a1", b"0" * 4096, tag=0)
    stop = threading.Event()
    seen: list[int] = []
    problems: list[str] = []

    def read() -> None:
        while not stop.is_set():
            try:
                ref = other.resolve("acme", "a1")
                tag = json.loads((ref.path / CONFIG_NAME).read_text())["tag"]
                weights = (ref.path / WEIGHTS_NAME).read_bytes()
            except NotFound:
                continue
            if weights != str(tag % 10).encode() * 4096:
                problems.append(f"v{ref.key.version}: config tag {tag}, weights {weights[:4]!r}")
            seen.append(ref.key.version)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + 6.0
    tag = 0
    while tag < 40 and time.monotonic() < deadline:
        tag += 1
        if tag % 7 == 0:
            store.delete("acme", "a1")
        upload(store, "acme", "a1", str(tag % 10).encode() * 4096, tag=tag)
        store.collect_garbage_soon(lambda key: False, only=("acme", "a1"))
    stop.set()
    for t in readers:
        t.join(timeout=30)
    assert not problems, problems[:5]
    assert len(set(seen)) >= 3, f"the readers must have seen several versions to prove anything: {sorted(set(seen))}"


def test_local_cache_stays_within_its_bound(store: S3AdapterStore, options: S3Options, tmp_path: Path) -> None:
    small = open_on(options, tmp_path / "small", cache_bytes=3 * 10_000)
    for i in range(6):
        upload(store, "acme", f"a{i}", bytes([i]) * 9_000)
        small.resolve("acme", f"a{i}")
        total = sum(e.size for e in small.cache.entries())
        assert total <= 3 * 10_000, f"{total} bytes cached after {i + 1} adapters"
    assert small.cache.versions("acme", "a5") == {1} and small.cache.versions("acme", "a0") == set()
    refetched = small.resolve("acme", "a0").path / WEIGHTS_NAME
    assert refetched.read_bytes() == bytes([0]) * 9_000, "evicted: fetched again"


def test_recently_used_entries_outlive_the_bound(store: S3AdapterStore, options: S3Options, tmp_path: Path) -> None:
    """A version resolved moments ago may not be read yet: eviction waits `min_age_s` for it."""
    held = open_on(options, tmp_path / "held", cache_bytes=10_000, min_age_s=60.0)
    for i in range(3):
        upload(store, "acme", f"a{i}", bytes([i]) * 9_000)
        assert held.resolve("acme", f"a{i}").path.is_dir()
    assert len(held.cache.entries()) == 3


def test_an_unreachable_store_fails_fast_and_recovers(tmp_path: Path) -> None:
    with moto_s3() as moto:
        options = moto.new_bucket()
        store = open_on(options, tmp_path / "a")
        upload(store, "acme", "a1", b"x")
        moto.stop()
        for call in (lambda: store.resolve("acme", "a1"), lambda: store.list("acme"),
                     lambda: upload(store, "acme", "a1", b"y")):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as refused:
                call()
            assert time.monotonic() - started < 10.0
            assert options.location.bucket not in refused.value.message
        moto.start()
        assert (store.resolve("acme", "a1").path / WEIGHTS_NAME).read_bytes() == b"x"
        assert upload(store, "acme", "a1", b"y") == 2
        store.close()


def test_an_endpoint_that_never_answers_is_a_bounded_wait(moto: MotoS3, tmp_path: Path) -> None:
    """A peer that accepts connections and then says nothing (a hung proxy): timeouts end the wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        options = S3Options(S3Location("lpx-silent", "p"), endpoint, "us-east-1", timeout_s=1.0, max_attempts=2)
        store = S3AdapterStore(ObjectStore(options), VersionCache(tmp_path / "cache", MiB))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.resolve("acme", "a1")
        waited = time.monotonic() - started
        assert 1.0 <= waited < 6.0, f"{waited:.1f}s: two attempts of a 1 s read timeout, plus one backoff"
        store.close()


def test_opening_a_missing_bucket_is_refused(moto: MotoS3, tmp_path: Path) -> None:
    options = moto.new_bucket()
    missing = S3Options(S3Location("no-such-bucket", "x"), moto.endpoint, "us-east-1", 2.0, 2)
    with pytest.raises(StoreUnavailable, match="s3://no-such-bucket/x"):
        open_on(missing, tmp_path / "a")
    open_on(options, tmp_path / "a").close()


def test_a_pointer_removed_by_hand_reads_as_never_published(moto: MotoS3, options: S3Options,
                                                             store: S3AdapterStore) -> None:
    upload(store, "acme", "a1", b"x")
    pointer = f"{options.location.key('acme', 'a1')}/pointer.json"
    moto.client().delete_object(Bucket=options.location.bucket, Key=pointer)
    with pytest.raises(NotFound):
        store.resolve("acme", "a1")
    assert upload(store, "acme", "a1", b"y") == 2, "the orphaned v1 keeps its number"


def test_opening_an_unreachable_store_is_refused(tmp_path: Path) -> None:
    with moto_s3() as moto:
        options = moto.new_bucket()
        moto.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            open_on(options, tmp_path / "a")
        assert time.monotonic() - started < 10.0
