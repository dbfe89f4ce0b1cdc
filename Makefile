# Two commands do everything on a fresh machine:
#   make repro   create .venv if missing, then run the whole DVC pipeline
#   make test    create .venv if missing, then run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: repro test bench clean-venv

$(BIN)/dvc: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

repro: $(BIN)/dvc
	dvc repro

test: $(BIN)/dvc
	pytest

bench: $(BIN)/dvc
	python bench/bench.py

clean-venv:
	rm -rf $(VENV)
