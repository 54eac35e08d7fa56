# Quick start: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: env demo test lint bench clean

env: $(STAMP)

# torch first, pinned, so that no other package pulls a CUDA build of it.
$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

demo: env
	$(PY) demo.py

test: env
	$(PY) -m ruff check plugins tests bench convert.py install.py demo.py verify.py
	$(PY) -m pytest -q tests

lint: env
	$(PY) -m ruff check plugins tests bench convert.py install.py demo.py verify.py

bench: env
	$(PY) bench/bench_scale.py

clean:
	rm -rf $(VENV) demo_out
