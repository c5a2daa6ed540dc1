# Quick start: `make demo` and `make test`. Both create .venv on first use.
# The venv sees system site-packages, so a torch already installed (a CUDA build included) is reused;
# otherwise torch==$(TORCH_VERSION) is installed (the CPU build where pip finds one locally).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all test-slow lint demo bench gpu-suite gpu-session test-gpu-stack clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[test,demo]"
	touch $(STAMP)

# ruff (configured in pyproject.toml): line length, import order, pyflakes; make test runs it first.
lint: $(STAMP)
	$(PY) -m ruff check .

# make test: the default tier (every test but those marked slow); make test-all: both tiers.
test: lint
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: test test-slow

demo: $(STAMP)
	$(PY) -m lfm demo

# Benchmarks (bench/): the byte/launch ledger, then every benchmark file, with tables at the end.
# bench.cpu: the authors' eager code vs every engine of lfm predict on CPU, interleaved (a few minutes).
# On CPU: eager vs our torch backend, a few minutes. With a GPU: every provider and dtype.
BENCH_PYTEST := -m pytest bench -q --benchmark-columns=median,iqr,rounds,iterations --benchmark-sort=name

bench: $(STAMP)
	$(PY) -m bench.cpu
	$(PY) -m bench.ledger
	$(PY) $(BENCH_PYTEST)

# Unattended on a CUDA machine without network: installs nothing, stays under 8 minutes, saves after every
# row. See bench/gpu_suite.sh and README "Performance". GPU_SUITE_OUT and GPU_SUITE_BUDGET_S override the
# defaults (bench/results/, 450 s).
gpu-suite:
	bash bench/gpu_suite.sh

# A lent GPU's whole session in one command under 9 minutes: the GPU run, backend="auto"'s table from it, then
# the launch-option sweep in the time left, every file flat in OUT (bench/gpu_session.sh).
OUT ?= bench/results/session
gpu-session:
	bash bench/gpu_session.sh $(OUT)

# The GPU machines' stack (triton 3.6, numpy 2.x >= 2.4) in a separate venv, then the whole suite on CPU.
# torch 2.11 is only on PyPI as the CUDA build (several GB with its CUDA wheels), so this takes the CPU
# build of torch $(TORCH_VERSION) that pip finds locally.
GPU_STACK_VENV ?= .venv-gpu-stack
GPU_STACK_PY := $(GPU_STACK_VENV)/bin/python

test-gpu-stack:
	test -x $(GPU_STACK_PY) || $(PYTHON) -m venv $(GPU_STACK_VENV)
	$(GPU_STACK_PY) -m pip install "torch==$(TORCH_VERSION)" "triton==3.6.*" "numpy>=2.4,<3"
	$(GPU_STACK_PY) -m pip install -e ".[test,demo]"
	$(GPU_STACK_PY) -c "import numpy, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
	$(GPU_STACK_PY) -m pytest -q

clean:
	rm -rf $(VENV) $(GPU_STACK_VENV) *.egg-info .pytest_cache
