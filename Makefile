# ambert: two commands set everything up on a fresh machine.
#   make demo   quantize the bundled MiniLM and compare the integer model with FP32
#   make test   the whole test suite (pytest)
# Both create and fill .venv when it is missing or pyproject.toml changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv demo test bench clean distclean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/ambert demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/fidelity.py
	$(BIN)/python benchmarks/array_efficiency.py

clean:
	rm -rf build .pytest_cache sim_build

distclean: clean
	rm -rf $(VENV)
