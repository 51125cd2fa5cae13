"""Hostile inputs to the server's own parsers, through real HTTP: adapter-config regexes, fuzzed
uploads (config and safetensors header) and JSONL lines.

The regex test runs the server as a subprocess: a backtracking regex holds
the GIL, so an in-process server would freeze the test itself rather than
fail it. Every wait is bounded.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings as hsettings, strategies as st

from tests.adapters.adapter_fuzz import EDITS, HEADER_EDITS, mutate_header
from tests.api.adapter_http import ALICE, adapter_files, auth, store_files, write_keys
from tests.hardening.helpers import assert_error, assert_serving, train_body
from tests.harness import spawn_server

# Each takes minutes to hours per module name on Python's re; on RE2 microseconds.
REGEX_CASES = {
    # alternation under a star, then PEFT's ordinary targets: re tries the hostile branch first
    "target alternation": ({"target_modules": r"(.|\w)*z|.*\.(q|v)_proj"}, 201, ""),
    "layers_pattern": ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0],
                        "layers_pattern": r"(.*)*x"}, 422, "match no module"),
    "rank_pattern key": ({"rank_pattern": {r"(\w|_)*z": 4}}, 201, ""),
}


def _serve_args(model_dir: Path, store: Path, keys: Path) -> list[str]:
    return ["--model", str(model_dir), "--store", str(store), "--device", "cpu", "--dtype", "float32",
            "--api-keys", str(keys), "--log-level", "warning"]


def test_backtracking_regexes_in_configs_never_stall_the_server(tiny_model_dir: Path, tmp_path: Path,
                                                                peft_adapters: dict[str, Path]) -> None:
    store = tmp_path / "store"
    with spawn_server(_serve_args(tiny_model_dir, store, write_keys(tmp_path / "keys.json"))) as (proc, url):
        for i, (case, (changes, status, words)) in enumerate(REGEX_CASES.items()):
            adapter = tmp_path / f"adapter-{i}"
            shutil.copytree(peft_adapters["lora_qv"], adapter)
            cfg = json.loads((adapter / "adapter_config.json").read_text())
            (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
            before = store_files(store)
            result: dict[str, httpx.Response] = {}
            thread = threading.Thread(target=lambda a=adapter, i=i: result.update(r=httpx.put(
                f"{url}/v1/adapters/hostile-{i}", files=adapter_files(a), headers=auth(ALICE), timeout=30)))
            thread.start()
            try:
                while thread.is_alive():  # /ready answers all through the upload
                    assert httpx.get(f"{url}/ready", timeout=5).status_code == 200, case
                    thread.join(timeout=0.05)
            finally:
                thread.join(timeout=35)
            assert "r" in result, f"{case}: no answer to the upload within 30 s"
            r = result["r"]
            if status == 201:
                assert r.status_code == 201, (case, r.text)
            else:
                assert_error(r, status, words)
                assert store_files(store) == before, case
        assert httpx.get(f"{url}/ready", timeout=5).status_code == 200


@hsettings(max_examples=40, derandomize=True, deadline=10_000, database=None,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                  HealthCheck.data_too_large])
@given(kind=st.sampled_from(["lora_qv", "miss_balance"]), config_edits=EDITS, header=st.none() | st.fixed_dictionaries(
    HEADER_EDITS))
def test_fuzzed_uploads_are_201_or_a_clean_4xx_and_refusals_leave_the_store(server, peft_adapters, kind,
                                                                             config_edits, header):
    url, store = server
    files = adapter_files(peft_adapters[kind])
    cfg = {**json.loads(files["config"][1]), **config_edits}
    files["config"] = ("adapter_config.json", json.dumps({k: v for k, v in cfg.items() if v is not None}).encode(),
                       "application/json")
    if header is not None:
        files["weights"] = ("adapter_model.safetensors", mutate_header(files["weights"][1], **header),
                            "application/octet-stream")
    before = store_files(store)
    r = httpx.put(f"{url}/v1/adapters/fuzzed", files=files, timeout=30)
    if r.status_code in (200, 201):
        event("published")
        return
    event(f"refused {r.status_code}")
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert_error(r, r.status_code)
    assert store_files(store) == before


@pytest.mark.parametrize("line", [
    b"[" * 100_000 + b"]" * 100_000,  # past CPython's json recursion limit: RecursionError
    b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b', "completion": "x"}',  # parses, but deeper than max_json_depth
])
def test_deeply_nested_jsonl_line_is_a_422(url: str, line: bytes) -> None:
    spec = json.dumps({k: v for k, v in train_body().items() if k != "data"})
    data = b'{"prompt": "a", "completion": "b"}\n' + line + b"\n"
    r = httpx.post(f"{url}/v1/training/jobs/upload", data={"spec": spec},
                   files={"data": ("d.jsonl", data, "application/jsonl")}, timeout=30)
    assert_error(r, 422, "data line 2", "nested deeper than 32 levels")
    assert_serving(url)
