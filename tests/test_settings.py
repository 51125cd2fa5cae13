"""Settings refuse what they would otherwise ignore: a misspelled env twin, an unknown keyword."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from server.settings import Settings, check_environment


def test_a_misspelled_env_variable_stops_the_start_naming_the_setting(monkeypatch) -> None:
    monkeypatch.setenv("LORAPLEX_MAX_BATCHH", "4")
    with pytest.raises(ValidationError, match="LORAPLEX_MAX_BATCHH .did you mean LORAPLEX_MAX_BATCH"):
        Settings()


def test_the_env_twin_of_every_field_and_the_clients_variables_are_accepted() -> None:
    check_environment({"LORAPLEX_MAX_BATCH": "4", "loraplex_port": "1", "LORAPLEX_URL": "http://x",
                       "LORAPLEX_API_KEY": "k", "LORAPLEX_HOST_PORT": "80", "PATH": "/bin"})


def test_an_unknown_keyword_is_refused() -> None:
    with pytest.raises(ValidationError, match="max_batchh"):
        Settings(max_batchh=4)


def test_quantize_has_an_env_twin_and_refuses_unknown_modes_and_int4_on_the_cpu(monkeypatch) -> None:
    assert Settings().quantize == "none"
    monkeypatch.setenv("LORAPLEX_QUANTIZE", "int8")
    assert Settings().quantize == "int8"
    assert Settings(quantize="nf4", device="cpu").quantize == "nf4"  # bitsandbytes: CPU and CUDA
    with pytest.raises(ValidationError, match="quantize\n  Input should be 'none', 'int8', 'int4', 'nf4' or 'fp4'"):
        Settings(quantize="int2")
    with pytest.raises(ValidationError, match="quantize=int4 runs on CUDA only .* use quantize=int8 or nf4 on the CPU"):
        Settings(quantize="int4", device="cpu")


def test_cpu_threads_leave_a_core_to_the_event_loop_unless_told_otherwise(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert Settings().torch_threads == max(1, len(os.sched_getaffinity(0)) - 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert Settings().torch_threads == 3, "the OpenMP variable a user set is honoured"
    monkeypatch.setenv("LORAPLEX_CPU_THREADS", "5")
    assert Settings().torch_threads == 5, "the setting wins"
    with pytest.raises(ValidationError, match="cpu_threads"):
        Settings(cpu_threads=-1)
