# Two commands do everything on a fresh machine:
#   make repro   create .venv from uv.lock if missing, then run the whole DVC pipeline
#   make test    create .venv from uv.lock if missing, then run the tests
# Both (re)build the fused CPU kernel (src/fmnist/csrc) first when it or setup.py changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
# uv's version, as locked in uv.lock's dev group: the bootstrap installs this one, and the sync keeps it
UV_VERSION := $(shell sed -n 's/^dev = .*"uv==\([^"]*\)".*/\1/p' pyproject.toml)
ifeq ($(UV_VERSION),)
$(error pyproject.toml: no "uv==..." in the dev dependency group)
endif

.PHONY: repro test bench lock clean-venv

# Whether a C++ compiler is on PATH, as a marker file: installing one makes the next make build the kernel.
CXX_MARK := $(VENV)/.cxx-$(if $(shell command -v $${CXX:-c++}),found,missing)

$(CXX_MARK):
	mkdir -p $(VENV)
	rm -f $(VENV)/.cxx-*
	touch $@

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Every package comes from uv.lock (--locked: exactly as locked, and an error if uv.lock no longer
# matches pyproject.toml). The kernel is compiled against the venv's torch, so everything else goes in
# first and the package last, without build isolation (which would download a second torch, GBs,
# just to build with). The kernel must then load, unless there is no C++ compiler (the package works
# without it, with cpu_kernel: torch); on failure the stamp is not touched, so the next make builds again.
$(BIN)/dvc: pyproject.toml uv.lock setup.py $(wildcard src/fmnist/csrc/*) $(CXX_MARK) $(BIN)/uv
	$(BIN)/uv sync --locked --all-extras --python $(BIN)/python --no-install-project
	$(BIN)/uv sync --locked --all-extras --python $(BIN)/python --reinstall-package fmnist
	@$(BIN)/python -m fmnist.kernels || ! command -v $${CXX:-c++} >/dev/null || \
	  { echo "the C++ build failed: $(BIN)/uv sync -v --reinstall-package fmnist shows the compiler's errors"; exit 1; }
	touch $@

# Re-resolve uv.lock after editing pyproject.toml's dependencies (or to take newer releases: make lock
# UPGRADE=--upgrade); commit both files together.
lock: $(BIN)/uv
	$(BIN)/uv lock $(UPGRADE)

repro: $(BIN)/dvc
	dvc repro

test: $(BIN)/dvc
	pytest

bench: $(BIN)/dvc
	python bench/bench.py
	python bench/load.py
	python bench/latency.py
	python bench/serve.py

clean-venv:
	rm -rf $(VENV)
