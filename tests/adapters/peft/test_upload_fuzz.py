"""Property-based fuzzing of adapter parsing: config and safetensors header, through `read_adapter`.

Whatever the bytes, the validator answers with an AdapterError (a 4xx) or a
loaded adapter, promptly: never another exception, never a hang. Examples
start from a PEFT-saved adapter and mutate it, so they reach the deep checks
and not only the first refusal. Derandomized: CI sees the same examples.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings as hsettings, strategies as st

from tests.adapters import adapter_factory as af
from tests.adapters.adapter_fuzz import EDITS, HEADER_EDITS, JSON, mutate_header
from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_config import parse_config
from server.adapters.peft.peft_format import read_adapter
from server.errors import AdapterError

FUZZ = hsettings(max_examples=120, derandomize=True, deadline=3000, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[af.BaseModel, dict[str, Path]]:
    root = tmp_path_factory.mktemp("fuzz-src")
    base = af.tiny_base(seed=0)
    return base, {kind: af.make_peft(base, kind, root / kind) and root / kind for kind in ("lora_qv", "miss_mini")}


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
        yield Path(d)


def _fresh(sources, workdir: Path, kind: str) -> Path:
    dst = workdir / "adapter"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(sources[1][kind], dst)
    return dst


def _validate(path: Path, base, settings) -> None:
    """The property: a loaded adapter or an AdapterError (422); anything else fails the test."""
    try:
        assert read_adapter(path, base, AdapterLimits.from_settings(settings)).modules
        event("loaded")
    except AdapterError as e:
        assert e.status == 422 and str(e)
        event("refused")


@FUZZ
@given(kind=st.sampled_from(["lora_qv", "miss_mini"]), edits=EDITS)
def test_mutated_configs_load_or_are_refused(sources, workdir, kind, edits):
    path = _fresh(sources, workdir, kind)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(edits)
    (path / "adapter_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    _validate(path, sources[0], af.adapter_settings(workdir))


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps(v).encode()),
                     st.integers(1, 200).map(lambda n: b"[" * n + b"]" * n),
                     st.integers(1, 200).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)))
def test_arbitrary_config_bytes_parse_or_are_refused(raw):
    try:
        parse_config(raw, AdapterLimits.from_settings(af.adapter_settings(Path("unused"))))
    except AdapterError as e:
        assert e.status == 422


@FUZZ
@given(**HEADER_EDITS)
def test_mutated_safetensors_headers_load_or_are_refused(sources, workdir, edits, extra, trim, header_len_delta):
    path = _fresh(sources, workdir, "lora_qv")
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(mutate_header(weights.read_bytes(), edits, extra, trim, header_len_delta))
    _validate(path, sources[0], af.adapter_settings(workdir))
