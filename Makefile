# marca — every command sets itself up on first use: a virtual environment in .venv with the project
# installed in editable mode and its simulation and test dependencies (all from PyPI).

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
FPGA_STAMP := $(VENV)/.installed-fpga
BOARD   ?= ulx3s-85f
FPGA_CONFIG ?= fpga-small
FPGA_OPTS ?=
CONFIG  ?= default
OUT     ?= build/verilog/$(CONFIG)
JOBS    ?= 2

.DEFAULT_GOAL := help
.PHONY: help setup verilog lint sim test-sim test test-fast bench bitstream clean

help:  ## list the commands
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: CONFIG=<preset or config.json> (default: default), OUT=<folder>, JOBS=<test workers>,"
	@echo "             FPGA_CONFIG=<preset or config.json> (default: fpga-small), BOARD=ulx3s-85f,"
	@echo "             FPGA_OPTS=<more build options, e.g. --time-limit 60>"

# --no-compile, then marca.bytecode: byte-compiles only what is imported (half the set-up time).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile --disable-pip-version-check -e ".[test]"
	$(PY) -m marca.bytecode
	touch $@

$(FPGA_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-compile --disable-pip-version-check -e ".[test,fpga]"
	$(PY) -m marca.bytecode
	touch $@

setup: $(STAMP)  ## create .venv and install marca with its dependencies

verilog: $(STAMP)  ## emit the Verilog of CONFIG, with its config.json, into OUT
	$(PY) -m marca verilog --config $(CONFIG) --out $(OUT)

lint: verilog  ## verilator --lint-only -Wall on the emitted Verilog
	$(PY) -m marca lint --dir $(OUT)

sim: $(STAMP)  ## demo: a small Mamba language model generating text on the accelerator RTL in Verilator, checked against the ISS (SIM_ARGS=...; --mixer: one mixer)
	$(PY) -m marca.demo --out build/demo $(SIM_ARGS)

test-sim: $(STAMP)  ## only the cocotb + Verilator tests
	$(PY) -m pytest -m verilator -n $(JOBS)

test: $(STAMP)  ## run the whole test suite (what CI runs)
	$(PY) -m pytest -n $(JOBS) --durations=25

test-fast: $(STAMP)  ## only the quick tests (no Verilator)
	$(PY) -m pytest -m "not verilator" -n $(JOBS)

bench: $(FPGA_STAMP)  ## run the benchmarks; figures printed and written to build/bench/*.json
	$(PY) -m marca bench --out build/bench

bitstream: $(FPGA_STAMP)  ## build an FPGA bitstream (FPGA_CONFIG=fpga-small, BOARD=ulx3s-85f) with PyPI tools
	$(PY) -m marca.fpga.build --config $(FPGA_CONFIG) --board $(BOARD) $(FPGA_OPTS)

clean:  ## remove build outputs (keeps .venv)
	rm -rf build
