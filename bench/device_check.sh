#!/usr/bin/env bash
# One-shot GPU check: runs unattended on a lent GPU node from a fresh checkout, in under 8 minutes.
#
#   bash bench/device_check.sh              # on the GPU node (results under $OUT, default ./device-out)
#   DEVICE_CHECK_CPU=1 bash bench/device_check.sh   # CPU dry run: every stage that needs no CUDA, tiny sizes
#   bash bench/device_check.sh --prepare    # HERE, with registry access: build .devcarry/ for the node
#
# The lent node has no network and takes at most 64 MiB per call, so what the project needs beyond
# the node's image (its Python packages, the 94 MiB default model) is prepared here into .devcarry/
# and carried over two calls (README "GPU check"): the compressed GGUF's first part in the first
# call, the wheels, the model's config+tokenizer and the GGUF's second part in the second. Without
# the GGUF the model stage falls back to the same architecture with random weights (said so in the
# summary). torch==2.13.0 (the project pin) cannot travel (GBs): the node's own CUDA torch is used
# unless the pin installs within its budget; the summary records the versions that ran.
#
# Stage budgets, in seconds (GPU run; the CPU dry run uses the second column). A stage is cut at its
# budget or at the global deadline, whichever comes first; a failed or cut stage is recorded and the
# next one runs. The whole run is bounded by TOTAL_S.
#
#   stage       gpu   cpu   what
#   env          15    15   GPU, driver, CUDA / cuDNN / torch / triton versions
#   install      45     -   carried wheels into a private site dir; torch pin; the project (no deps)
#   model        90   180   default model as an HF dir (carried GGUF parts -> safetensors)
#   model-arch   30    30   only if that failed: the same architecture, random weights
#   pytest       60   120   pytest -m cuda (CUDA-marked tests; on CPU: none run)
#   sdpa         30    60   SDPA backend chosen / accepted for the engine's attention shapes
#   launch       45    90   kernels / ops / copies / syncs per decode step, base vs 16 scattered adapters
#   bench       180   240   python -m bench --quick (CPU: scenario 1 only, tiny load)
#   vllm        120     -   pip install vllm (offline: skipped) and our ratio to its multi-LoRA
#   report       10    10   device_check.json + device_check.md (reserved out of TOTAL_S)
#   TOTAL_S     470   800   (DEVICE_CHECK_TOTAL_S overrides)
set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
CARRY="${DEVICE_CHECK_CARRY:-$REPO/.devcarry}"
CPU_MODE="${DEVICE_CHECK_CPU:-0}"

# ---- --prepare: run here, before the device calls ---------------------------------------------
WHEEL_PACKAGES=(fastapi starlette pydantic pydantic_core pydantic-settings python-dotenv typing-inspection
  annotated-types annotated-doc opentelemetry-api uvicorn python-multipart gguf google-re2 xgrammar
  apache-tvm-ffi pytest-asyncio peft transformers)
CALL_LIMIT_MIB=64

prepare() {
  local py="${PYTHON:-python3}" pkgs=() name ver gguf repo_mib part_a_mib
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/model-a" "$CARRY/model-b" || return 1
  for name in "${WHEEL_PACKAGES[@]}"; do  # the versions this checkout is tested with
    ver="$("$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")" || return 1
    pkgs+=("$name==$ver")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$CARRY/wheels" "${pkgs[@]}" || return 1
  "$py" -m bench.device_model --dest "$CARRY/tmp-model" --save-arch "$CARRY/arch" || return 1
  gguf="$("$py" -c 'from server.model.load import embedded_gguf_path; print(embedded_gguf_path())')" || return 1
  xz -T2 -6 -c "$gguf" >"$CARRY/model.gguf.xz" || return 1
  sha256sum "$gguf" | cut -d' ' -f1 >"$CARRY/arch/gguf.sha256"
  basename "$gguf" >"$CARRY/arch/gguf.name"
  # The first call carries the checkout and part a; the second the checkout, wheels, arch and part b.
  repo_mib=$(( ($(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1) >> 20) + 1 ))
  part_a_mib=$(( CALL_LIMIT_MIB - repo_mib - 3 ))
  split -b "${part_a_mib}M" -d -a 2 "$CARRY/model.gguf.xz" "$CARRY/gguf.xz.part" || return 1
  mv "$CARRY/gguf.xz.part00" "$CARRY/model-a/" && mv "$CARRY"/gguf.xz.part0[1-9] "$CARRY/model-b/" || return 1
  rm -rf "$CARRY/model.gguf.xz" "$CARRY/tmp-model"
  du -sm "$CARRY"/* | sed 's/^/  MiB /'
  echo "call 1: carry [.devcarry/model-a] (checkout ~${repo_mib} MiB); call 2 at once (the node stays warm"
  echo "30 s): carry [.devcarry/wheels, .devcarry/arch, .devcarry/model-b], run bash bench/device_check.sh"
}

if [ "${1:-}" = "--prepare" ]; then
  prepare
  exit $?
fi
if [ "${1:-}" = "--dry-run" ]; then
  CPU_MODE=1
fi

# ---- the run ---------------------------------------------------------------------------------
export OUT="${OUT:-$REPO/device-out}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")"
LOG="$OUT/device_check.log"
STAGES="$WORK/stages.tsv"
mkdir -p "$OUT" "$WORK/bench"
: >"$LOG"
: >"$STAGES"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export LORAPLEX_CACHE_DIR="${LORAPLEX_CACHE_DIR:-$WORK/cache}"
PY="${PYTHON:-python3}"

if [ "$CPU_MODE" = "1" ]; then
  DEVICE=cpu; DTYPE=float32; TOTAL_S=800
  B_ENV=15; B_INSTALL=0; B_MODEL=180; B_PYTEST=120; B_SDPA=60; B_LAUNCH=90; B_BENCH=240; B_VLLM=0
  LAUNCH_ARGS=(--steps 1 --prompt 16)
  BENCH_ARGS=(--quick --scenarios 1 --concurrency 2 --new-tokens 4)
  export LORAPLEX_CACHE_DIR="${DEVICE_CHECK_CACHE_DIR:-$HOME/.cache/loraplex}"  # reuse this box's converted model
else
  DEVICE=cuda; DTYPE=bfloat16; TOTAL_S=470
  B_ENV=15; B_INSTALL=45; B_MODEL=90; B_PYTEST=60; B_SDPA=30; B_LAUNCH=45; B_BENCH=180; B_VLLM=120
  LAUNCH_ARGS=(--steps 3 --prompt 64)
  BENCH_ARGS=(--quick)
fi
TOTAL_S="${DEVICE_CHECK_TOTAL_S:-$TOTAL_S}"  # a smaller total shows the time-boxing at work
REPORT_RESERVE=10
DEADLINE=$(( $(date +%s) + TOTAL_S - REPORT_RESERVE ))
printf '{"device": "%s", "dtype": "%s", "cpu_dry_run": %s, "total_budget_s": %s}\n' \
  "$DEVICE" "$DTYPE" "$([ "$CPU_MODE" = 1 ] && echo true || echo false)" "$TOTAL_S" >"$WORK/settings.json"

record() {  # name status seconds budget detail
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(printf '%s' "$5" | tr '\t\n|' '  /')" >>"$STAGES"
  printf '== %s: %s (%ss of %ss) %s\n' "$1" "$2" "$3" "$4" "$5" | tee -a "$LOG"
}

# run_stage NAME BUDGET FUNCTION: runs FUNCTION in a child bash under `timeout`; never stops the script.
run_stage() {
  local name="$1" budget="$2" fn="$3" left t start rc status detail
  if [ "$budget" -le 0 ]; then
    record "$name" skipped 0 0 "${SKIP_REASON:-not in this mode}"
    return 0
  fi
  left=$(( DEADLINE - $(date +%s) ))
  t=$(( budget < left ? budget : left ))
  if [ "$t" -lt 5 ]; then
    record "$name" skipped 0 "$budget" "no time left under the ${TOTAL_S}s total"
    return 0
  fi
  echo "-- $name (budget ${t}s)" >>"$LOG"
  start=$(date +%s)
  timeout --kill-after=5 "$t" bash -c "$fn" >>"$LOG" 2>&1 </dev/null
  rc=$?
  detail="$(cat "$WORK/$name.detail" 2>/dev/null)"
  case "$rc" in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="failed (rc $rc)" ;;
  esac
  record "$name" "$status" "$(( $(date +%s) - start ))" "$t" "$detail"
}

stage_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
  "$PY" -m bench.device_report env --out "$WORK/env.json" && cat "$WORK/env.json"
}

stage_install() {
  local wheels=("$CARRY"/wheels/*.whl) torch_ver
  if [ -e "${wheels[0]}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "${wheels[@]}" || return 1
    echo "${#wheels[@]} carried wheels" >"$WORK/install.detail"
  else
    echo "no carried wheels (.devcarry/wheels)" >"$WORK/install.detail"
  fi
  torch_ver="$(PYTHONPATH="$WORK/site:$PYTHONPATH" "$PY" -c 'import torch; print(torch.__version__)')"
  case "$torch_ver" in
    2.13.0*) echo "; torch $torch_ver (the pin)" >>"$WORK/install.detail" ;;
    *)  # offline this fails within seconds; a half-done install stays in its own dir, never on the path
      if timeout 25 "$PY" -m pip install -q --retries 0 --timeout 5 --no-cache-dir --target "$WORK/torch-site" \
          torch==2.13.0 >/dev/null 2>&1 \
        && PYTHONPATH="$WORK/torch-site" "$PY" -c 'import torch; assert torch.cuda.is_available()'; then
        echo "$WORK/torch-site" >"$WORK/torch.path"
        echo "; torch 2.13.0 installed" >>"$WORK/install.detail"
      else
        echo "; torch pin 2.13.0 not installable here (offline): the image's torch $torch_ver runs" \
          >>"$WORK/install.detail"
      fi ;;
  esac
  timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO" >/dev/null 2>&1 \
    && echo "; project installed (editable, no deps)" >>"$WORK/install.detail" \
    || echo "; project runs from the checkout (PYTHONPATH)" >>"$WORK/install.detail"
  # Say at once which package is missing, rather than leave every later stage to fail on it.
  local missing
  missing="$(PYTHONPATH="$PYTHONPATH:$WORK/site" "$PY" -c 'import server.app, bench.cli, peft, gguf' 2>&1 | tail -1)"
  [ -n "$missing" ] && echo "; import check: $missing" >>"$WORK/install.detail"
  tr -d '\n' <"$WORK/install.detail" >"$WORK/install.detail.1" && mv "$WORK/install.detail.1" "$WORK/install.detail"
  [ -z "$missing" ]
}

stage_model() {
  local gguf="" parts=() name
  parts=("$CARRY"/model-a/gguf.xz.part* "$CARRY"/model-b/gguf.xz.part*)
  name="$(cat "$CARRY/arch/gguf.name" 2>/dev/null || echo model.gguf)"
  if [ -e "${parts[0]}" ] && [ -e "${parts[-1]}" ] && [ "${#parts[@]}" -ge 2 ]; then
    mkdir -p "$WORK/gguf"
    if command -v xz >/dev/null; then  # xz decompresses the blocks in parallel; Python's lzma on one core
      cat "${parts[@]}" | xz -dc -T0 >"$WORK/gguf/$name" || rm -f "$WORK/gguf/$name"
    else
      cat "${parts[@]}" \
        | "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)' \
        >"$WORK/gguf/$name" || rm -f "$WORK/gguf/$name"
    fi
    if [ -f "$WORK/gguf/$name" ] \
      && [ "$(sha256sum "$WORK/gguf/$name" | cut -d' ' -f1)" = "$(cat "$CARRY/arch/gguf.sha256")" ]; then
      gguf="$WORK/gguf/$name"
    else
      echo "GGUF parts incomplete or corrupt: falling back"
    fi
  fi
  "$PY" -m bench.device_model --dest "$WORK/SmolLM2-135M-Instruct" ${gguf:+--gguf "$gguf"} --arch "$CARRY/arch" \
    >"$WORK/model.out" || return 1
  tail -1 "$WORK/model.out" >"$WORK/model.json"
  "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["source"])' "$WORK/model.json" >"$WORK/model.detail"
}

stage_model_arch() {
  "$PY" -m bench.device_model --dest "$WORK/SmolLM2-135M-Instruct-arch" --arch "$CARRY/arch" \
    >"$WORK/model.out" || return 1
  tail -1 "$WORK/model.out" >"$WORK/model.json"
  "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["source"])' "$WORK/model.json" >"$WORK/model-arch.detail"
}

model_path() { "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["path"])' "$WORK/model.json" 2>/dev/null; }

stage_pytest() {
  # Test modules that need a package the node lacks (dev-only extras) fail to collect; that must not
  # stop the CUDA-marked tests elsewhere from running, and alone it is not a failure of theirs.
  "$PY" -m pytest -m cuda -q -p no:cacheprovider --continue-on-collection-errors tests >"$WORK/pytest.txt" 2>&1
  local rc=$? summary
  cat "$WORK/pytest.txt"
  summary="$(grep -E '(passed|failed|skipped|error|deselected|no tests ran)' "$WORK/pytest.txt" | tail -1)"
  echo "$summary" >"$WORK/pytest.detail"
  [ "$rc" -eq 5 ] && return 0  # none selected: no CUDA-marked test exists yet
  if [ "$rc" -eq 1 ] && ! grep -qE '[0-9]+ failed' <<<"$summary"; then
    echo "$summary (collection errors: $(grep -c '^ERROR ' "$WORK/pytest.txt") modules need packages not on this machine)" \
      >"$WORK/pytest.detail"
    return 0
  fi
  return "$rc"
}

stage_sdpa() {
  "$PY" -m bench.sdpa_report --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --out "$WORK/sdpa.json" \
    >/dev/null || return 1
  "$PY" -m bench.device_report detail sdpa --work "$WORK" >"$WORK/sdpa.detail"
}

stage_launch() {
  "$PY" -m bench.launch_count --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" "${LAUNCH_ARGS[@]}" \
    --out "$WORK/launch.json" >/dev/null || return 1
  "$PY" -m bench.device_report detail launch --work "$WORK" >"$WORK/launch.detail"
}

stage_bench() {
  local model_flag=()
  grep -q '(embedded package)' "$WORK/model.json" || model_flag=(--model "$MODEL")
  "$PY" -m bench "${BENCH_ARGS[@]}" --device "$DEVICE" --dtype "$DTYPE" "${model_flag[@]}" --out "$WORK/bench"
  local rc=$?
  [ -f "$WORK/bench/results.json" ] && cp "$WORK/bench/results.json" "$OUT/bench_quick.json"
  [ -f "$WORK/bench/RESULTS.md" ] && cp "$WORK/bench/RESULTS.md" "$OUT/bench_quick.md"
  "$PY" -m bench.device_report detail bench --work "$WORK" >"$WORK/bench.detail"
  return "$rc"
}

stage_vllm() {
  if ! "$PY" -c 'import vllm' >/dev/null 2>&1; then
    if ! timeout 20 "$PY" -m pip install -q --retries 0 --timeout 5 --no-cache-dir --target "$WORK/vllm-site" vllm \
        >/dev/null 2>&1; then
      echo "skipped: vllm is not installed and pip could not install it (no network on the node)" >"$WORK/vllm.detail"
      return 0
    fi
    export PYTHONPATH="$WORK/vllm-site:$PYTHONPATH"
  fi
  "$PY" -m bench.vllm_compare --model "$MODEL" --dtype "$DTYPE" --out "$WORK/vllm.json" || return 1
  "$PY" -m bench.device_report detail vllm --work "$WORK" >"$WORK/vllm.detail"
}

export REPO CARRY WORK PY DEVICE DTYPE
export -f stage_env stage_install stage_model stage_model_arch stage_pytest stage_sdpa stage_launch stage_bench \
  stage_vllm model_path
# Arrays do not cross into the child bash: pass them as words (none holds a space).
export LAUNCH_ARGS_S="${LAUNCH_ARGS[*]}" BENCH_ARGS_S="${BENCH_ARGS[*]}"

run_stage env "$B_ENV" stage_env
SKIP_REASON="CPU dry run: the shared environment is not touched" run_stage install "$B_INSTALL" stage_install
# The checkout first (its `server` wins), then the carried wheels and a pinned torch, then the image's packages.
[ -d "$WORK/site" ] && export PYTHONPATH="$PYTHONPATH:$WORK/site"
[ -f "$WORK/torch.path" ] && export PYTHONPATH="$PYTHONPATH:$(cat "$WORK/torch.path")"
run_stage model "$B_MODEL" stage_model
MODEL="$(model_path)"
if [ -z "$MODEL" ] && [ -f "$CARRY/arch/config.json" ]; then
  run_stage model-arch 30 stage_model_arch
  MODEL="$(model_path)"
fi
export MODEL
run_stage pytest "$B_PYTEST" stage_pytest
if [ -n "$MODEL" ]; then
  run_stage sdpa "$B_SDPA" stage_sdpa
  run_stage launch "$B_LAUNCH" 'LAUNCH_ARGS=($LAUNCH_ARGS_S); stage_launch'
  run_stage bench "$B_BENCH" 'BENCH_ARGS=($BENCH_ARGS_S); stage_bench'
  SKIP_REASON="CPU dry run: vLLM needs CUDA" run_stage vllm "$B_VLLM" stage_vllm
else
  for s in sdpa launch bench vllm; do record "$s" skipped 0 0 "no model (the model stage failed)"; done
fi

"$PY" -m bench.device_report summary --work "$WORK" --out "$OUT" >>"$LOG" 2>&1 || echo "report failed" | tee -a "$LOG"
cat "$OUT/device_check.md" 2>/dev/null
[ "${DEVICE_CHECK_KEEP:-0}" = 1 ] || rm -rf "$WORK"  # converted models: hundreds of MB
echo "results in $OUT"
