# Quick start: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: env demo test lint bench package-check clean

# Other megatron-core releases for tests/test_mcore_versions.py, beside the venv's 0.16.1 (not on its
# path; tests/mcore_versions.py puts one first on PYTHONPATH): 0.12.1, and 0.19.2, whose wheel is tagged
# cp312 but whose Python code runs on 3.11 (its one binary, datasets/helpers_cpp, is unused here), with
# the triton that torch 2.13.0's CUDA build pins (0.17+ imports triton unconditionally; the venv keeps
# none). --no-deps: the tests import nothing else of theirs.
SIDE := $(VENV)/side
MCORE_OLD := 0.12.1
MCORE_NEW := 0.19.2
TRITON := 3.7.1
SIDE_STAMP := $(SIDE)/.installed-$(MCORE_OLD)-$(MCORE_NEW)-$(TRITON)
SIDE_PIP := $(PY) -m pip install -q --no-deps --only-binary=:all: --no-warn-script-location --target

env: $(STAMP) $(SIDE_STAMP)

# torch first, pinned, so that no other package pulls a CUDA build of it; then the pinned test
# environment, and this project itself in editable mode (no dependencies: they are pinned above), so
# that tests, bench and demo import ckpt_lib / ckpt_verify / the plugins without path edits.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

$(SIDE_STAMP): $(STAMP)
	rm -rf $(SIDE)
	$(SIDE_PIP) $(SIDE)/mcore-$(MCORE_OLD) megatron-core==$(MCORE_OLD)
	$(SIDE_PIP) $(SIDE)/mcore-$(MCORE_NEW) --python-version 3.12 megatron-core==$(MCORE_NEW)
	$(SIDE_PIP) $(SIDE)/triton triton==$(TRITON)
	touch $(SIDE_STAMP)

demo: env
	$(PY) demo.py

test: env
	$(PY) -m ruff check plugins tests bench convert.py install.py demo.py verify.py
	$(PY) -m pytest -q tests

lint: env
	$(PY) -m ruff check plugins tests bench convert.py install.py demo.py verify.py

# `pip install .` into a fresh venv (torch first, as the README says), then the installed commands from
# outside the repository: help, a tiny conversion (a committed HF Qwen3 fixture to TP2) and its verification. CI runs it after the two README commands.
package-check:
	rm -rf /tmp/ckpt-package-check
	$(PYTHON) -m venv /tmp/ckpt-package-check
	/tmp/ckpt-package-check/bin/pip install -q torch==2.13.0
	/tmp/ckpt-package-check/bin/pip install -q .
	cd /tmp && /tmp/ckpt-package-check/bin/mcore-convert --loader hf --saver core_ext --help > /dev/null
	cd /tmp && /tmp/ckpt-package-check/bin/mcore-verify --help > /dev/null
	cd /tmp && /tmp/ckpt-package-check/bin/mcore-convert --model-type GPT --loader hf --saver core_ext \
		--load-dir $(CURDIR)/tests/fixtures/mindspore/hf_qwen3 --save-dir /tmp/ckpt-package-check/out \
		--target-tensor-parallel-size 2 > /dev/null
	cd /tmp && /tmp/ckpt-package-check/bin/mcore-verify --source $(CURDIR)/tests/fixtures/mindspore/hf_qwen3 \
		--converted /tmp/ckpt-package-check/out > /dev/null
	rm -rf /tmp/ckpt-package-check build
	@echo "package-check: pip install . gives working mcore-convert and mcore-verify"

bench: env
	$(PY) bench/bench_scale.py

clean:
	rm -rf $(VENV) demo_out
