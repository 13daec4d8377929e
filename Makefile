# ambert: two commands set everything up on a fresh machine.
#   make demo   quantize the bundled MiniLM and compare the integer model with FP32
#   make test   the whole test suite (pytest)
#   make report [QUICK=1]   measure every efficiency strategy on this machine: build/report/index.html
#   make bitstream BOARD=ulx3s|icebreaker [SIZE=small|medium|target] [TIME_LIMIT=seconds a tool may run]
#                  build a board's bitstream and its report
#   make program   BOARD=ulx3s|icebreaker [SIZE=small|medium|target]   program it (openFPGALoader / iceprog)
# Each creates and fills .venv when it is missing or pyproject.toml changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

BOARD  ?=
SIZE   ?= small

.PHONY: all venv demo test report bench bitstream program clean distclean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,report]'
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/ambert demo

test: $(STAMP)
	$(BIN)/python -m pytest

report: $(STAMP)
	$(BIN)/python -m ambert.report $(if $(QUICK),--quick)

bench: $(STAMP)
	$(BIN)/python benchmarks/fidelity.py
	$(BIN)/python benchmarks/array_efficiency.py

bitstream: $(STAMP)
	@test -n "$(BOARD)" || { echo "usage: make bitstream BOARD=ulx3s|icebreaker [SIZE=small|medium|target]"; exit 2; }
	$(BIN)/python -m ambert.boards.build $(BOARD) --size $(SIZE) $(if $(TIME_LIMIT),--time-limit $(TIME_LIMIT))

program: $(STAMP)
	@test -n "$(BOARD)" || { echo "usage: make program BOARD=ulx3s|icebreaker [SIZE=small|medium|target]"; exit 2; }
	$(BIN)/python -m ambert.boards.program $(BOARD) --size $(SIZE)

clean:
	rm -rf build .pytest_cache sim_build

distclean: clean
	rm -rf $(VENV)
