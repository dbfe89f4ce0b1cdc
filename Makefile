# Two commands do everything on a fresh machine:
#   make repro   create .venv if missing, then run the whole DVC pipeline
#   make test    create .venv if missing, then run the tests
# Both (re)build the fused CPU kernel (src/fmnist/csrc) first when it or setup.py changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
# torch and torchvision as pinned in pyproject.toml, so that the versions live in one place
TORCH_PINS := $(shell sed -n 's/^ *"\(torch[a-z]*==[^"]*\)".*/\1/p' pyproject.toml)
ifeq ($(TORCH_PINS),)
$(error pyproject.toml: no "torch==..." dependency found)
endif

.PHONY: repro test bench clean-venv

# Whether a C++ compiler is on PATH, as a marker file: installing one makes the next make build the kernel.
CXX_MARK := $(VENV)/.cxx-$(if $(shell command -v $${CXX:-c++}),found,missing)

$(CXX_MARK):
	mkdir -p $(VENV)
	rm -f $(VENV)/.cxx-*
	touch $@

# The kernel is compiled against the venv's torch: torch goes in first, then the package without
# pip's build isolation (which would download a second torch, GBs, just to build with). The kernel
# must then load, unless there is no C++ compiler (the package works without it, with
# cpu_kernel: torch); on failure the stamp is not touched, so the next make builds again.
$(BIN)/dvc: pyproject.toml setup.py $(wildcard src/fmnist/csrc/*) $(CXX_MARK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS) 'setuptools>=68' wheel
	$(BIN)/pip install --quiet --no-build-isolation -e '.[dev]'
	@$(BIN)/python -m fmnist.kernels || ! command -v $${CXX:-c++} >/dev/null || \
	  { echo "the C++ build failed: pip install -v --no-build-isolation -e . shows the compiler's errors"; exit 1; }
	touch $@

repro: $(BIN)/dvc
	dvc repro

test: $(BIN)/dvc
	pytest

bench: $(BIN)/dvc
	python bench/bench.py
	python bench/load.py
	python bench/latency.py

clean-venv:
	rm -rf $(VENV)
