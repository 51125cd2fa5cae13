"""Two real servers on one bucket (moto on loopback): what one publishes the other serves at once, re-uploads
under load never serve a mix of versions, and a bucket that goes away is a quick 503, then recovers."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from server.adapters.store.object_store import S3Options
from server.cli import build_parser
from server.settings import Settings

from tests.adapters.store.s3_moto import CREDENTIALS, MotoS3
from tests.api.adapter_http import ALICE, BOB, auth, build_adapter, load_tiny, upload, write_keys
from tests.harness import (REPO_ROOT, TRAIN_DATA, cpu_settings, free_port, running_server, serve_command,
                           spawn_server, wait_job)

PROMPT = "The quick brown fox jumps over the lazy dog and then"
TOKENS = 8


@pytest.fixture(scope="module")
def peft_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("s3-peft")
    base = load_tiny(tiny_model_dir)
    return {name: build_adapter(base, "lora_all", out / name, seed=seed, scale=1.0)
            for name, seed in (("x", 1), ("y", 7))}


@pytest.fixture(scope="module")
def bucket(moto: MotoS3) -> S3Options:
    return moto.new_bucket()


@pytest.fixture(scope="module")
def servers(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, moto: MotoS3,
            bucket: S3Options) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    tmp = tmp_path_factory.mktemp("s3-serving")
    options = bucket
    keys = write_keys(tmp / "keys.json")

    def settings(name: str):  # each server: its own local dir (cache, jobs), the one shared bucket
        return cpu_settings(tiny_model_dir, tmp / name, api_keys=keys, max_batch=4, max_adapters_resident=2,
                            s3_store=f"{options.location}", s3_endpoint_url=moto.endpoint,
                            s3_region="us-east-1", s3_timeout_s=2.0, s3_max_attempts=2)

    with running_server(settings("a")) as url_a, running_server(settings("b")) as url_b, \
            httpx.Client(base_url=url_a, timeout=60) as a, httpx.Client(base_url=url_b, timeout=60) as b:
        yield a, b


def generate(client: httpx.Client, adapter_id: str | None, key: str = ALICE) -> httpx.Response:
    return client.post("/generate", json={"prompt": PROMPT, "adapter_id": adapter_id, "temperature": 0,
                                          "max_new_tokens": TOKENS}, headers=auth(key))


def text(client: httpx.Client, adapter_id: str | None) -> str:
    r = generate(client, adapter_id)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def test_an_upload_through_one_server_is_served_by_the_other_at_once(servers, peft_dirs) -> None:
    a, b = servers
    assert upload(a, "shared", peft_dirs["x"]).status_code == 201
    through_b = text(b, "shared")  # no wait, no poll: the very next request
    assert through_b == text(a, "shared")
    assert through_b != text(b, None), "the adapter must change the output, or this test proves nothing"
    listed = b.get("/v1/adapters", headers=auth(ALICE))
    assert listed.status_code == 200 and "shared" in [r["id"] for r in listed.json()["data"]]
    assert generate(b, "shared", key=BOB).status_code == 404, "tenants stay apart across servers"
    assert upload(a, "shared", peft_dirs["y"]).status_code == 201
    assert text(b, "shared") == text(a, "shared") != through_b, "a re-upload is served at once too"
    assert a.delete("/v1/adapters/shared", headers=auth(ALICE)).status_code == 204
    gone = generate(b, "shared")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found"


def test_a_trained_adapter_is_published_to_the_bucket(servers) -> None:
    """The trainer publishes through the same store: a job finished on one server is served by the other."""
    a, b = servers
    spec = {"adapter_id": "trained", "method": "lora", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
            "data": TRAIN_DATA, "steps": 3, "learning_rate": 1e-2, "batch_size": 2, "seed": 0}
    r = a.post("/v1/training/jobs", json=spec, headers=auth(ALICE))
    assert r.status_code == 202, r.text
    job = wait_job(str(a.base_url), r.json()["id"], lambda j: j["status"] in ("succeeded", "failed"),
                   headers=auth(ALICE))
    assert job["status"] == "succeeded", job
    record = b.get("/v1/adapters/trained", headers=auth(ALICE))
    assert record.status_code == 200 and record.json()["version"] == 1
    assert text(b, "trained") == text(a, "trained")


def test_a_dedication_is_kept_in_the_bucket(servers, peft_dirs, moto: MotoS3, bucket: S3Options) -> None:
    """The merge marker lives with the adapter, so any server starting on the bucket re-merges it."""
    a, _ = servers
    assert upload(a, "dedicated", peft_dirs["x"]).status_code == 201
    marker = {"Bucket": bucket.location.bucket, "Key": f"{bucket.location.key('alice', 'dedicated')}/.merged"}
    merged = a.post("/v1/adapters/dedicated/merge", headers=auth(ALICE))
    assert merged.status_code == 201 and merged.json()["mode"] == "merged", merged.text
    assert moto.client().head_object(**marker)["ContentLength"] == 0
    assert a.delete("/v1/adapters/dedicated/merge", headers=auth(ALICE)).status_code == 200
    assert moto.client().list_objects_v2(Bucket=marker["Bucket"], Prefix=marker["Key"]).get("KeyCount") == 0


def test_reuploads_and_deletes_under_load_never_serve_a_mix(servers, peft_dirs) -> None:
    """Server A swaps the adapter between two weight sets (and deletes it) while B serves it: every answer
    is exactly one set's output, or a 404 while it is deleted."""
    a, b = servers
    outputs = {}
    for name in ("x", "y"):
        assert upload(a, "swap", peft_dirs[name]).status_code == 201
        outputs[name] = text(b, "swap")
    assert outputs["x"] != outputs["y"]
    stop = threading.Event()
    answers: list[tuple[int, str]] = []

    def read() -> None:
        while not stop.is_set():
            r = generate(b, "swap")
            answers.append((r.status_code, r.json()["text"] if r.status_code == 200 else r.json()["error"]["type"]))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + 20.0
    for i in range(12):
        if time.monotonic() > deadline:
            break
        if i % 4 == 3:
            assert a.delete("/v1/adapters/swap", headers=auth(ALICE)).status_code == 204
        name = "xy"[i % 2]
        assert upload(a, "swap", peft_dirs[name]).status_code == 201
        assert text(b, "swap") == outputs[name], "B serves the version A just published"
    stop.set()
    for t in readers:
        t.join(timeout=60)
    unexpected = [ans for ans in answers if ans not in {(200, outputs["x"]), (200, outputs["y"]), (404, "not_found")}]
    assert not unexpected, unexpected[:3]
    assert answers, "the readers were served while the adapter changed"


def test_an_unreachable_store_is_a_quick_503_then_recovers(servers, peft_dirs, moto: MotoS3) -> None:
    """Runs last in this module: it stops the module's moto server (and starts it again)."""
    a, b = servers
    assert upload(a, "steady", peft_dirs["x"]).status_code == 201
    before = text(b, "steady")
    moto.stop()
    try:
        stream = {"prompt": PROMPT, "adapter_id": "steady", "max_new_tokens": 4, "stream": True}
        for call in (lambda: generate(b, "steady"), lambda: b.get("/v1/adapters", headers=auth(ALICE)),
                     lambda: b.post("/generate", json=stream, headers=auth(ALICE)),
                     lambda: upload(a, "steady", peft_dirs["y"]),
                     lambda: b.post("/v1/completions", json={"model": "steady", "prompt": PROMPT, "max_tokens": 4},
                                    headers=auth(ALICE))):
            started = time.monotonic()
            r = call()
            assert time.monotonic() - started < 10.0, "bounded: timeouts and retries, never a hang"
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "store_unavailable" and "Retry-After" in r.headers
        assert text(b, None), "the base model needs no store"
    finally:
        moto.start()
    assert text(b, "steady") == before
    assert upload(a, "steady", peft_dirs["y"]).status_code == 201


def test_s3_settings_and_flags() -> None:
    args = build_parser().parse_args(["serve", "--s3-store", "s3://my-bucket/team", "--s3-endpoint-url",
                                      "http://minio:9000", "--s3-region", "eu-west-1"])
    assert vars(args) | {"command": None} == {"command": None, "s3_store": "s3://my-bucket/team",
                                             "s3_endpoint_url": "http://minio:9000", "s3_region": "eu-west-1"}
    for bad in ("my-bucket", "s3://", "s3://UPPER", "https://my-bucket"):
        with pytest.raises(ValidationError):
            Settings(s3_store=bad)
    assert Settings().s3_store is None, "the local directory stays the default"


def test_serve_with_a_bucket_that_does_not_answer_exits_in_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    done = subprocess.run(serve_command(["--store", str(tmp_path / "store"), "--s3-store", "s3://my-bucket/x",
                                         "--s3-endpoint-url", f"http://127.0.0.1:{port}"]),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **CREDENTIALS, "LORAPLEX_S3_TIMEOUT_S": "1"})
    assert done.returncode == 1, done.stderr
    assert "s3://my-bucket/x cannot be used" in done.stderr and "Traceback" not in done.stderr


def test_serve_on_a_bucket_end_to_end(tiny_model_dir: Path, tmp_path: Path, moto: MotoS3, peft_dirs) -> None:
    """`loraplex serve --s3-store` as a process: it starts on the bucket, stores uploads there, serves them."""
    options = moto.new_bucket()
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--store", str(tmp_path / "s"),
            "--s3-store", str(options.location), "--s3-endpoint-url", moto.endpoint, "--s3-region", "us-east-1"]
    with spawn_server(args, env=CREDENTIALS, startup_timeout=120) as (_, url), httpx.Client(base_url=url,
                                                                                          timeout=60) as c:
        assert upload(c, "cli", peft_dirs["x"]).status_code == 201
        assert text(c, "cli")
    listed = moto.client().list_objects_v2(Bucket=options.location.bucket)["Contents"]
    assert f"{options.location.key('default', 'cli')}/pointer.json" in [o["Key"] for o in listed]
