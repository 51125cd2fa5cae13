"""Adapter REST API over real HTTP: round trip, refused uploads, ids, isolation, load under bad uploads."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from server.app import create_app
from tests.api.adapter_http import (
    ADMIN, ALICE, BOB, adapter_files, auth, build_adapter, load_tiny, raw_request, store_files, upload,
    write_keys,
)
from tests.conftest import tiny_llama_config
from tests.harness import cpu_settings, running_server

MAX_ADAPTER_BYTES = 512 * 1024


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT-saved adapters (save_pretrained) for the tiny model, plus one for a different model."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("peft")
    base = load_tiny(tiny_model_dir)
    made = {kind: build_adapter(base, kind, out / kind) for kind in ("lora_qv", "miss_balance", "bone")}
    made["lora_qv_2"] = build_adapter(base, "lora_qv", out / "lora_qv_2", seed=2)
    torch.manual_seed(0)
    other = LlamaForCausalLM(tiny_llama_config(hidden_size=96, intermediate_size=192, vocab_size=1024))
    made["other_model"] = build_adapter(type(base)(model=other), "lora_qv", out / "other_model")
    return made


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("adapters-api")
    settings = cpu_settings(tiny_model_dir, tmp / "store",
                            api_keys=write_keys(tmp / "keys.json"), max_adapter_bytes=MAX_ADAPTER_BYTES)
    with running_server(create_app(settings)) as url:
        yield url, settings.store


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


def test_round_trip(client: httpx.Client, server, adapters) -> None:
    r = upload(client, "rt-lora", adapters["lora_qv"])
    assert r.status_code == 201, r.text
    rec = r.json()
    weights = (adapters["lora_qv"] / "adapter_model.safetensors").read_bytes()
    assert rec["id"] == "rt-lora" and rec["tenant"] == "alice" and rec["version"] == 1
    assert rec["type"] == "lora" and rec["rank"] == 8 and rec["target_modules"] == ["q_proj", "v_proj"]
    assert rec["sha256"] == hashlib.sha256(weights).hexdigest() and rec["size_bytes"] == len(weights)
    assert rec["mode"] == "unmerged" and rec["resident"] is False and rec["created_at"].endswith("Z")
    assert set(rec) >= {"id", "tenant", "type", "variant", "rank", "target_modules", "size_bytes", "sha256",
                        "version", "created_at", "mode", "resident"}

    listed = client.get("/v1/adapters", headers=auth(ALICE)).json()["data"]
    assert [a["id"] for a in listed if a["id"] == "rt-lora"] == ["rt-lora"]
    got = client.get("/v1/adapters/rt-lora", headers=auth(ALICE)).json()
    assert {k: got[k] for k in ("sha256", "version", "type")} == {k: rec[k] for k in ("sha256", "version", "type")}

    r2 = upload(client, "rt-lora", adapters["lora_qv_2"])
    assert r2.status_code == 201 and r2.json()["version"] == 2 and r2.json()["sha256"] != rec["sha256"]
    assert client.get("/v1/adapters/rt-lora", headers=auth(ALICE)).json()["version"] == 2

    assert client.delete("/v1/adapters/rt-lora", headers=auth(ALICE)).status_code == 204
    r = client.get("/v1/adapters/rt-lora", headers=auth(ALICE))
    assert r.status_code == 404 and r.json()["error"]["message"] == "adapter 'rt-lora' not found"
    assert client.delete("/v1/adapters/rt-lora", headers=auth(ALICE)).status_code == 404
    assert "rt-lora" not in [a["id"] for a in client.get("/v1/adapters", headers=auth(ALICE)).json()["data"]]
    # Files are gone once no request holds them (nothing runs on this adapter here).
    assert not [f for f in store_files(server[1]) if "rt-lora" in f and "deleted_through" not in f]


@pytest.mark.parametrize("kind, type_", [("miss_balance", "miss"), ("bone", "bone")])
def test_upload_miss_and_bone(client: httpx.Client, adapters, kind: str, type_: str) -> None:
    r = upload(client, f"up-{kind.replace('_', '-')}", adapters[kind])
    assert r.status_code == 201, r.text
    assert r.json()["type"] == type_ and r.json()["rank"] > 0


def _safetensors_with_bad_offsets(src: Path) -> bytes:
    data = (src / "adapter_model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 10**6, end + 10**6]  # points past the end of the file
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _with_nan(src: Path) -> bytes:
    tensors = load_file(src / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    buf = src.parent / "nan.safetensors"
    save_file(tensors, buf)
    return buf.read_bytes()


def _torch_pickle(src: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(load_file(src / "adapter_model.safetensors"), buf)
    return buf.getvalue()


def _config(src: Path, **changes) -> bytes:
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(changes)
    return json.dumps(cfg).encode()


def bad_uploads(adapters: dict[str, Path]) -> dict[str, tuple[dict, int, str]]:
    """name -> (multipart files, expected status, words the message must contain)."""
    src = adapters["lora_qv"]
    good = adapter_files(src)
    cfg, weights = good["config"], good["weights"]

    def w(data: bytes, name: str = "adapter_model.safetensors") -> tuple:
        return (name, data, "application/octet-stream")

    return {
        "pickled_bin": ({"config": cfg, "weights": w(_torch_pickle(src), "adapter_model.bin")}, 422, "pickle"),
        "pickle_renamed": ({"config": cfg, "weights": w(_torch_pickle(src))}, 422, "pickle"),
        "raw_pickle": ({"config": cfg, "weights": w(pickle.dumps({"a": 1}, protocol=4))}, 422, "pickle"),
        "truncated": ({"config": cfg, "weights": w(weights[1][: len(weights[1]) // 2])}, 422, "safetensors"),
        "offsets_past_end": ({"config": cfg, "weights": w(_safetensors_with_bad_offsets(src))}, 422, "data"),
        "config_not_json": ({"config": ("adapter_config.json", b"{not json"), "weights": weights}, 422, "JSON"),
        "config_not_object": ({"config": ("adapter_config.json", b"[1]"), "weights": weights}, 422, "object"),
        "other_model": (adapter_files(adapters["other_model"]), 422, "shape"),
        "nan": ({"config": cfg, "weights": w(_with_nan(src))}, 422, "NaN"),
        "dora": ({"config": ("adapter_config.json", _config(src, use_dora=True)), "weights": weights}, 422, "DoRA"),
        "rank_over_max": ({"config": ("adapter_config.json", _config(src, r=4096)), "weights": weights}, 422, "rank"),
        "unknown_target": ({"config": ("adapter_config.json", _config(src, target_modules=["nope_proj"])),
                            "weights": weights}, 422, "target_modules"),
        "over_size_limit": ({"config": cfg, "weights": w(b"\0" * (MAX_ADAPTER_BYTES + 1))}, 413, "limit"),
        "over_body_limit": ({"config": cfg, "weights": w(b"\0" * (MAX_ADAPTER_BYTES + 2 * 1024 * 1024))}, 413,
                            "exceeds"),
        "missing_weights": ({"config": cfg}, 422, "weights"),
        "missing_config": ({"weights": weights}, 422, "config"),
        "extra_part": ({"config": cfg, "weights": weights, "evil": ("x.py", b"print(1)")}, 422, "evil"),
    }


BAD_NAMES = ["pickled_bin", "pickle_renamed", "raw_pickle", "truncated", "offsets_past_end", "config_not_json",
             "config_not_object", "other_model", "nan", "dora", "rank_over_max", "unknown_target",
             "over_size_limit", "over_body_limit", "missing_weights", "missing_config", "extra_part"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_upload_is_clean_4xx_and_leaves_nothing(client: httpx.Client, server, adapters, name: str) -> None:
    files, status, words = bad_uploads(adapters)[name]
    before = store_files(server[1])
    r = upload(client, f"bad-{name.replace('_', '-')}", files=files)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert words.lower() in message.lower(), message
    assert store_files(server[1]) == before


def test_not_multipart_is_422(client: httpx.Client, server) -> None:
    before = store_files(server[1])
    r = client.put("/v1/adapters/not-multipart", json={"config": {}}, headers=auth(ALICE))
    assert r.status_code == 422 and "multipart" in r.json()["error"]["message"]
    r = client.put("/v1/adapters/garbled", content=b"--xx\r\ngarbage", headers={
        **auth(ALICE), "Content-Type": "multipart/form-data; boundary=xx"})
    assert 400 <= r.status_code < 500, r.text
    assert store_files(server[1]) == before


def test_streamed_upload_over_limit_is_cut(client: httpx.Client, server, adapters) -> None:
    """A chunked upload with no Content-Length is cut at the limit (413), not buffered."""
    before = store_files(server[1])
    boundary = "bnd123"
    cfg = (adapters["lora_qv"] / "adapter_config.json").read_bytes()

    def body() -> Iterator[bytes]:
        yield f"--{boundary}\r\nContent-Disposition: form-data; name=\"config\"; filename=\"c.json\"\r\n\r\n".encode()
        yield cfg
        yield (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"weights\"; "
               "filename=\"adapter_model.safetensors\"\r\n\r\n").encode()
        for _ in range(64):  # 4 MiB in all, far past the 512 KiB limit
            yield b"\0" * 65536

    r = client.put("/v1/adapters/streamed-big", content=body(), headers={
        **auth(ALICE), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    assert store_files(server[1]) == before


BAD_ID_PATHS = [
    "/v1/adapters/..", "/v1/adapters/%2e%2e", "/v1/adapters/%2E%2E", "/v1/adapters/..%2f..%2fetc",
    "/v1/adapters/a%2fb", "/v1/adapters/a/b", "/v1/adapters//etc/passwd", "/v1/adapters/%2fetc%2fpasswd",
    "/v1/adapters/%00", "/v1/adapters/a%00b", "/v1/adapters/UPPER", "/v1/adapters/" + "a" * 65,
    "/v1/adapters/%EF%BD%81", "/v1/adapters/.hidden", "/v1/adapters/-dash", "/v1/adapters/a..b",
    "/v1/adapters/%20", "/v1/adapters/a%5cb", "/v1/adapters/", "/v1/adapters/a/b/c",
]


@pytest.mark.parametrize("path", BAD_ID_PATHS)
@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
def test_bad_ids_are_clean_4xx_and_write_nothing(server, adapters, path: str, method: str) -> None:
    url, store = server
    before = store_files(store)
    boundary = "b0undary"
    cfg = (adapters["lora_qv"] / "adapter_config.json").read_bytes()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"config\"\r\n\r\n").encode() + cfg + \
        f"\r\n--{boundary}--\r\n".encode() if method == "PUT" else b""
    status, payload = raw_request(url, method, path, body=body, headers={
        **auth(ALICE), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 422, (status, payload)  # API.md: any id outside the rule is 422, even with a '/'
    assert "invalid adapter id" in payload["error"]["message"], payload
    assert store_files(store) == before


def test_isolation_between_tenants(client: httpx.Client, server, adapters) -> None:
    assert upload(client, "private", adapters["lora_qv"], key=ALICE).status_code == 201
    alice_rec = client.get("/v1/adapters/private", headers=auth(ALICE)).json()
    # Bob cannot see, read, delete or generate with it; the answers match an unknown id's.
    assert "private" not in [a["id"] for a in client.get("/v1/adapters", headers=auth(BOB)).json()["data"]]
    for method in ("GET", "DELETE"):
        r = client.request(method, "/v1/adapters/private", headers=auth(BOB))
        unknown = client.request(method, "/v1/adapters/no-such-adapter", headers=auth(BOB))
        assert r.status_code == unknown.status_code == 404
        assert r.json()["error"]["message"].replace("private", "X") == \
            unknown.json()["error"]["message"].replace("no-such-adapter", "X")
    r = client.post("/generate", json={"prompt": "hi", "adapter_id": "private", "max_new_tokens": 2},
                    headers=auth(BOB))
    assert r.status_code == 404, r.text
    r = client.post("/v1/completions", json={"model": "private", "prompt": "hi", "max_tokens": 2},
                    headers=auth(BOB))
    assert r.status_code == 404, r.text
    assert "private" not in [m["id"] for m in client.get("/v1/models", headers=auth(BOB)).json()["data"]]
    # Bob's upload under the same id is his own adapter; Alice's is untouched.
    assert upload(client, "private", adapters["lora_qv_2"], key=BOB).json()["tenant"] == "bob"
    assert client.get("/v1/adapters/private", headers=auth(ALICE)).json() == alice_rec
    # Bob deleting "his" private leaves Alice's in place.
    assert client.delete("/v1/adapters/private", headers=auth(BOB)).status_code == 204
    assert client.get("/v1/adapters/private", headers=auth(ALICE)).status_code == 200
    # Admins see every tenant and may address one explicitly.
    everything = client.get("/v1/adapters", headers=auth(ADMIN)).json()["data"]
    assert ("alice", "private") in {(a["tenant"], a["id"]) for a in everything}
    r = client.get("/v1/adapters/private", params={"tenant": "alice"}, headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["sha256"] == alice_rec["sha256"]
    # A non-admin passing tenant= is refused; missing or unknown keys are 401.
    assert client.get("/v1/adapters/private", params={"tenant": "alice"}, headers=auth(BOB)).status_code == 422
    assert client.get("/v1/adapters/private").status_code == 401
    assert client.get("/v1/adapters/private", headers=auth("not-a-real-key")).status_code == 401


def test_good_requests_succeed_while_bad_uploads_rain(client: httpx.Client, server, adapters) -> None:
    bad = bad_uploads(adapters)
    names = [BAD_NAMES[i % len(BAD_NAMES)] for i in range(50)]
    assert upload(client, "steady", adapters["lora_qv"]).status_code == 201
    failures: list[str] = []
    lock = threading.Lock()

    def throw(i: int, name: str) -> None:
        with httpx.Client(base_url=server[0], timeout=120) as c:
            files, status, _ = bad[name]
            r = upload(c, f"rain-{i}", files=files)
            if r.status_code != status:
                with lock:
                    failures.append(f"bad {name}: {r.status_code} {r.text[:200]}")

    def good(i: int) -> None:
        with httpx.Client(base_url=server[0], timeout=120) as c:
            rs = [c.post("/generate", json={"prompt": f"hello {i}", "max_new_tokens": 4}, headers=auth(ALICE)),
                  c.get("/v1/adapters/steady", headers=auth(ALICE)),
                  upload(c, f"good-{i}", adapters["miss_balance"])]
            for r in rs:
                if r.status_code not in (200, 201):
                    with lock:
                        failures.append(f"good {i}: {r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=throw, args=(i, n)) for i, n in enumerate(names)]
    threads += [threading.Thread(target=good, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    ids = {a["id"] for a in client.get("/v1/adapters", headers=auth(ALICE)).json()["data"]}
    assert {f"good-{i}" for i in range(6)} <= ids and not any(i.startswith("rain-") for i in ids)
    assert not [f for f in store_files(server[1]) if "rain-" in f or f.startswith(".tmp/")]
