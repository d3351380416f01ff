# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv on first use; torch 2.13.0 (the CPU build) is installed first so that the
# project's `torch<2.14` requirement is already satisfied and pip never pulls a CUDA wheel.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.torchslim-installed

.PHONY: demo test lint bench install

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/torchslim demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -x

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[all,bench]"  # B2's OpenVINO/NNCF peers (no other torch)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run.py all
