#!/usr/bin/env bash
# Builds and runs the images for real, with podman (no Docker engine needed):
#   1. host set-up (docker/setup-host.sh: podman, runc, debootstrap) and a Debian
#      bookworm base image bootstrapped locally if missing (no registry pull);
#   2. the CPU image: built, started on named volumes with an API-keys file, then
#      /ready, /generate with and without an adapter uploaded through the API,
#      the non-root user, the image's HEALTHCHECK, a SIGTERM stop (exit 0) and a
#      start on the same volumes (the adapter survives, same greedy text);
#   3. the GPU image (CUDA torch from the package index, several GB): built, and
#      its import-and-version check plus a Triton launcher compile run on the CPU.
# Every wait is bounded; containers, volumes and built images are removed on exit
# (the bootstrapped base is kept for the next run).
#
#   docker/check.sh [--skip-gpu | --only-gpu] [--keep] [--report FILE]
#
# Env: LORAPLEX_CHECK_BASE (base image; default: the bootstrapped Debian),
# CPU_TORCH_INDEX_URL (default the PyTorch CPU index, or pip's own where that is
# unreachable), LORAPLEX_CHECK_PORT, *_TIMEOUT (seconds, below).
set -euo pipefail
export CI=true
exec </dev/null

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SKIP_GPU=0 SKIP_CPU=0 KEEP=0 REPORT=""
while (($#)); do
    case $1 in
        --skip-gpu) SKIP_GPU=1 ;;
        --only-gpu) SKIP_CPU=1 ;;
        --keep) KEEP=1 ;;
        --report) REPORT=$2; shift ;;
        *) echo "usage: $0 [--skip-gpu | --only-gpu] [--keep] [--report FILE]" >&2; exit 2 ;;
    esac
    shift
done

BASE=${LORAPLEX_CHECK_BASE:-localhost/loraplex-base:bookworm}
BOOTSTRAP_TIMEOUT=${BOOTSTRAP_TIMEOUT:-900}
CPU_BUILD_TIMEOUT=${CPU_BUILD_TIMEOUT:-2400}
GPU_BUILD_TIMEOUT=${GPU_BUILD_TIMEOUT:-5400}
READY_TIMEOUT=${READY_TIMEOUT:-600}
REQUEST_TIMEOUT=${REQUEST_TIMEOUT:-300}
NAME=loraplex-check-$$
CPU_IMAGE=localhost/$NAME:cpu
GPU_IMAGE=localhost/$NAME:cuda
PYTHON=${PYTHON:-python3}
PORT=${LORAPLEX_CHECK_PORT:-$($PYTHON -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL=http://127.0.0.1:$PORT
KEY=change-me-tenant-key-0001  # tenant "default" in docker/api_keys.example.json
WORK=$(mktemp -d)
# This VM forbids raising rlimits: give podman explicit ones within the host's hard limits.
NOFILE=$(ulimit -Hn); ((NOFILE > 65536)) && NOFILE=65536
LIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit nproc=4096:4096)
PODMAN=(podman --runtime runc)
declare -A RESULT=()

log() { printf '[check %5ds] %s\n' "$SECONDS" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
record() { RESULT[$1]=$2; log "$1 = $2"; }

cleanup() {
    local rc=$?
    "${PODMAN[@]}" rm -f -t 5 "$NAME-cpu" >/dev/null 2>&1 || true
    "${PODMAN[@]}" volume rm -f "$NAME-store" "$NAME-cache" >/dev/null 2>&1 || true
    if ((!KEEP)); then
        "${PODMAN[@]}" rmi -f "$CPU_IMAGE" "$GPU_IMAGE" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    log "$( ((rc == 0)) && echo PASSED || echo "FAILED (exit $rc)")"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

write_report() {
    [[ -n $REPORT ]] || return 0
    local k
    {
        echo "{"
        for k in "${!RESULT[@]}"; do printf '  "%s": "%s",\n' "$k" "${RESULT[$k]}"; done
        printf '  "total_s": "%s"\n}\n' "$SECONDS"
    } >"$REPORT"
}

image_mb() { echo $(($("${PODMAN[@]}" image inspect --format '{{.Size}}' "$1") / 1000000)); }

# --- 1. host and base -------------------------------------------------------
"$ROOT/docker/setup-host.sh"
if ! "${PODMAN[@]}" image exists "$BASE"; then
    [[ $BASE == localhost/loraplex-base:bookworm ]] || fail "base image $BASE not found"
    log "bootstrapping $BASE (debootstrap bookworm, minbase + python3)"
    t0=$SECONDS
    timeout "$BOOTSTRAP_TIMEOUT" nice -n 10 debootstrap --variant=minbase \
        --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" http://deb.debian.org/debian \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import -q - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
    record bootstrap_s $((SECONDS - t0))
fi

build() {  # build TIMEOUT DOCKERFILE IMAGE [podman build args...]
    local limit=$1 file=$2 image=$3
    shift 3
    log "building $image from $file"
    local t0=$SECONDS
    # --format docker: the OCI format drops HEALTHCHECK. --network host + the host's pip
    # config, wheel directories and CA bundle: the registries as this machine reaches them.
    timeout --kill-after=30 "$limit" nice -n 10 "${PODMAN[@]}" build --format docker --layers=false \
        --network host "${LIMITS[@]}" --build-arg "BASE_IMAGE=$BASE" "$@" \
        -f "$ROOT/docker/$file" -t "$image" "$ROOT" >"$WORK/build.log" 2>&1 \
        || { tail -40 "$WORK/build.log" >&2; fail "build of $file"; }
    BUILD_S=$((SECONDS - t0))
}

pip_mounts() {  # -v arguments for the host's pip set-up; args: host_pip.py options
    local m
    while read -r m; do printf -- '-v\n%s\n' "$m"; done < <($PYTHON "$ROOT/docker/host_pip.py" "$WORK/pip" "$@")
}

# --- 2. CPU image -----------------------------------------------------------
cpu_check() {
CPU_TORCH_INDEX_URL=${CPU_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
if [[ -n $CPU_TORCH_INDEX_URL ]] && ! curl -fsS -o /dev/null --max-time 20 "$CPU_TORCH_INDEX_URL/torch/" 2>/dev/null; then
    log "$CPU_TORCH_INDEX_URL unreachable: torch from pip's configured index (it must serve a CPU build)"
    CPU_TORCH_INDEX_URL=""
fi
mapfile -t MOUNTS < <(pip_mounts)
build "$CPU_BUILD_TIMEOUT" Dockerfile.cpu "$CPU_IMAGE" "${MOUNTS[@]}" --build-arg "TORCH_INDEX_URL=$CPU_TORCH_INDEX_URL"
record cpu_build_s "$BUILD_S"
record cpu_image_mb "$(image_mb "$CPU_IMAGE")"
[[ $("${PODMAN[@]}" image inspect --format '{{json .Config.Healthcheck}}' "$CPU_IMAGE") == *"/ready"* ]] \
    || fail "the image has no HEALTHCHECK"

cp "$ROOT/docker/api_keys.example.json" "$WORK/api_keys.json"
chown 10001 "$WORK/api_keys.json" && chmod 600 "$WORK/api_keys.json"  # the container's user only
"${PODMAN[@]}" volume create "$NAME-store" >/dev/null
"${PODMAN[@]}" volume create "$NAME-cache" >/dev/null

api() {  # api METHOD PATH [curl args...] -> body on stdout; fails on a non-2xx
    local method=$1 path=$2
    shift 2
    curl -fsS --max-time "$REQUEST_TIMEOUT" -X "$method" -H "Authorization: Bearer $KEY" "$@" "$URL$path" \
        || { "${PODMAN[@]}" logs --tail 30 "$NAME-cpu" >&2; fail "$method $path"; }
}

wait_ready() {  # seconds until /ready answers 200; fails if the container exits or the time runs out
    local t0=$SECONDS
    until curl -fsS -o /dev/null --max-time 5 "$URL/ready" 2>/dev/null; do
        [[ $("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$NAME-cpu") == true ]] \
            || { "${PODMAN[@]}" logs --tail 40 "$NAME-cpu" >&2; fail "the container exited before /ready"; }
        ((SECONDS - t0 < READY_TIMEOUT)) || { "${PODMAN[@]}" logs --tail 40 "$NAME-cpu" >&2; fail "/ready timed out"; }
        sleep 2
    done
    echo $((SECONDS - t0))
}

generate() {  # generate ADAPTER_JSON -> the response's text
    api POST /generate -H 'Content-Type: application/json' \
        -d "{\"prompt\": \"Tell me about the sea.\", \"max_new_tokens\": 12, \"temperature\": 0, \"adapter_id\": $1}" \
        | $PYTHON -c 'import json, sys; print(json.load(sys.stdin)["text"])'
}

log "starting $CPU_IMAGE on port $PORT"
# --health-interval disable: no systemd here to time the checks; `healthcheck run` runs one.
"${PODMAN[@]}" run -d --name "$NAME-cpu" --network host "${LIMITS[@]}" --stop-timeout 45 --health-interval disable \
    -e "LORAPLEX_PORT=$PORT" \
    -v "$NAME-store:/data/adapters_store" -v "$NAME-cache:/data/cache" \
    -v "$WORK/api_keys.json:/run/secrets/api_keys:ro" "$CPU_IMAGE" >/dev/null
ready_s=$(wait_ready)
record cpu_first_start_s "$ready_s"

uid=$("${PODMAN[@]}" exec "$NAME-cpu" awk '/^Uid:/ {print $2}' /proc/1/status)
[[ $uid == 10001 ]] || fail "the server runs as uid $uid, not 10001"
"${PODMAN[@]}" healthcheck run "$NAME-cpu" || fail "the image's HEALTHCHECK fails on a ready server"
log "runs as uid 10001; HEALTHCHECK passes"

listed=$(api GET /v1/adapters)
[[ $listed == *'"pirate"'* && $listed == *'"french"'* ]] || fail "the new store volume lacks the example adapters: $listed"
base_text=$(generate null)
log "base: $base_text"
api PUT /v1/adapters/check-upload -o /dev/null \
    -F "config=@$ROOT/adapters_store/default/pirate/adapter_config.json" \
    -F "weights=@$ROOT/adapters_store/default/pirate/adapter_model.safetensors"
adapter_text=$(generate '"check-upload"')
log "adapter: $adapter_text"
[[ $adapter_text != "$base_text" ]] || fail "the adapter did not change the greedy text"

t0=$SECONDS
"${PODMAN[@]}" stop "$NAME-cpu" >/dev/null
record cpu_stop_s $((SECONDS - t0))
code=$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$NAME-cpu")
[[ $code == 0 ]] || fail "SIGTERM stop exited $code, not 0"
"${PODMAN[@]}" start "$NAME-cpu" >/dev/null
ready_s=$(wait_ready)
record cpu_restart_s "$ready_s"
api GET /v1/adapters/check-upload -o /dev/null
again=$(generate '"check-upload"')
[[ $again == "$adapter_text" ]] || fail "after a restart the adapter gives '$again', not '$adapter_text'"
log "the uploaded adapter survived the restart (same greedy text)"
"${PODMAN[@]}" rm -f -t 45 "$NAME-cpu" >/dev/null
((KEEP)) || "${PODMAN[@]}" rmi -f "$CPU_IMAGE" >/dev/null
record cpu_check_s "$SECONDS"
write_report
}
if ((!SKIP_CPU)); then cpu_check; fi

# --- 3. GPU image, checked on the CPU -----------------------------------------
if ((SKIP_GPU)); then
    log "GPU image skipped (--skip-gpu)"
    exit 0
fi
# The local CPU torch wheel (find-links) would win over the CUDA one: 2.13.0+cpu sorts above 2.13.0.
mapfile -t MOUNTS < <(pip_mounts --drop find-links)
build "$GPU_BUILD_TIMEOUT" Dockerfile "$GPU_IMAGE" "${MOUNTS[@]}"
record gpu_build_s "$BUILD_S"
record gpu_image_mb "$(image_mb "$GPU_IMAGE")"
# Import and versions, then what Triton does on a GPU node at first use: compile its
# launcher module (needs gcc and the Python headers in the image).
versions=$(timeout 300 "${PODMAN[@]}" run --rm --network none "${LIMITS[@]}" --entrypoint python "$GPU_IMAGE" -c '
import torch, triton, server.cli, client
from triton.runtime.build import compile_module_from_src
src = "#include <Python.h>\nstatic struct PyModuleDef m = {PyModuleDef_HEAD_INIT, \"probe\", NULL, -1, NULL};\nPyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&m); }\n"
compile_module_from_src(src, "probe")
assert torch.version.cuda, torch.__version__
print(f"torch {torch.__version__} cuda {torch.version.cuda} triton {triton.__version__}")
') || fail "the GPU image's import check"
record gpu_versions "$versions"
((KEEP)) || "${PODMAN[@]}" rmi -f "$GPU_IMAGE" >/dev/null
write_report
