# Two commands for a fresh machine: `make demo` and `make test`.
# Both create a local virtual environment in .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.themask-installed
# A CPU build of torch; users with GPUs install their own torch into the venv first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/themask demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check themask tests

bench: $(STAMP)
	$(VENV)/bin/themask bench

clean:
	rm -rf $(VENV) demo_out .pytest_cache
