"""Schema fuzzing: schemathesis drives every operation of the app's own OpenAPI spec against a real server.

Positive and negative cases; checks: no 5xx, status codes / content types /
bodies / headers conform to what the spec declares, schema-invalid input is
refused. Bounded to stay near a minute in `make test`; the `long` variant
runs many more examples per operation.

`positive_data_acceptance` is left out on purpose: schema-valid input is
still refused for reasons a schema cannot express (an adapter that does not
exist, a prompt over the context, a training target the model lacks).
413 is added to the statuses that count as refusing invalid input: a body
over the byte limit is refused before it is parsed (schemathesis's default
list lacks it; the long run found one such body).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import ChecksConfig
from schemathesis.generation import GenerationMode

from server.app import create_app
from tests.hardening.conftest import hardening_settings
from tests.harness import running_server

FAST_EXAMPLES = 12
LONG_EXAMPLES = 300
FUZZ_LIMITS = dict(max_new_tokens_limit=8, max_seq_len=64, max_train_steps=2, max_train_examples=4,
                   max_train_tokens_per_example=32, max_adapter_bytes=256 * 1024, max_queue=64)


def _spec() -> dict:
    """The spec the served app publishes (building an app loads no model)."""
    store = Path(tempfile.mkdtemp(prefix="loraplex-spec-"))
    return create_app(hardening_settings(Path("unused"), store, **FUZZ_LIMITS)).openapi()


schema = schemathesis.openapi.from_dict(_spec())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
REFUSALS = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]  # 5xx: not_a_server_error fails it
schema.config.checks = ChecksConfig.from_dict({"negative_data_rejection": {"expected-statuses": REFUSALS}})


def test_a_too_large_body_counts_as_refusing_invalid_input() -> None:
    assert "413" in schema.config.checks_config_for().negative_data_rejection.expected_statuses


@pytest.fixture(scope="module")
def fuzz_url(tiny_model_dir: Path, tmp_path_factory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("fuzz") / "store"
    with running_server(hardening_settings(tiny_model_dir, store, **FUZZ_LIMITS)) as url:
        yield url


def _check(case, url: str) -> None:
    case.call_and_validate(base_url=url, excluded_checks=[positive_data_acceptance], timeout=60)


@schema.parametrize()
@hypothesis.settings(max_examples=FAST_EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate,
                                                                                 hypothesis.Phase.explicit])
def test_fuzz_every_operation(case, fuzz_url: str) -> None:
    _check(case, fuzz_url)


@pytest.mark.long
@schema.parametrize()
@hypothesis.settings(max_examples=LONG_EXAMPLES, deadline=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_fuzz_every_operation_long(case, fuzz_url: str) -> None:
    _check(case, fuzz_url)
