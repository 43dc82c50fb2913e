# Two commands for a fresh machine: `make demo` and `make test` (`make gpu-check` on a GPU).
# Both create a local virtual environment in .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.themask-installed
# A CPU build of torch; users with GPUs install their own torch into the venv first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test lint bench gpu-check clean

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
	$(PY) -m pip install -q "ruff>=0.4" "mypy>=1.8"
	$(PY) -m ruff check themask tests
	$(PY) -m mypy themask

bench: $(STAMP)
	$(PY) benchmarks/bench.py

# Every CUDA path in one command, for whoever has a GPU (needs a CUDA build of torch in the
# venv): tests/test_cuda.py (no host syncs in forward and loss with amp off/bf16/fp16, CUDA vs
# CPU at fixed points, NCCL with >= 2 GPUs), then the benchmark on the GPU.
gpu-check: $(STAMP)
	@$(PY) -c "import torch, sys; ok = torch.cuda.is_available(); \
	print(f'torch {torch.__version__}, CUDA {torch.version.cuda}: ' + \
	(torch.cuda.get_device_name(0) if ok else 'no CUDA device')); sys.exit(0 if ok else 1)"
	$(PY) -m pytest -v -rs tests/test_cuda.py
	$(PY) benchmarks/bench.py --device cuda

clean:
	rm -rf $(VENV) demo_out .pytest_cache
