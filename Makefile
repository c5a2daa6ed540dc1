# Quick start: `make demo` and `make test`. Both create .venv on first use.
# The venv sees system site-packages, so a torch already installed (a CUDA build included) is reused;
# otherwise torch==$(TORCH_VERSION) is installed (the CPU build where pip finds one locally).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench gpu-suite clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[test,demo]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m lfm demo

# Benchmarks (bench/): the byte/launch ledger, then every benchmark file, with tables at the end.
# On CPU: eager vs our torch backend, a few minutes. With a GPU: every provider and dtype.
BENCH_PYTEST := -m pytest bench -q --benchmark-columns=median,iqr,rounds,iterations --benchmark-sort=name

bench: $(STAMP)
	$(PY) -m bench.ledger
	$(PY) $(BENCH_PYTEST)

# Unattended on a CUDA machine without network: installs nothing. Uses .venv when its torch sees a GPU,
# else $(PYTHON) with the checkout on PYTHONPATH; fails without a GPU. Runs the gpu-marked tests on the
# real kernels (TRITON_INTERPRET=0), the ledger and every benchmark, starting no benchmark after
# GPU_SUITE_BUDGET_S seconds (the skipped ones are listed), so the whole run stays under 8 minutes;
# writes bench/results/<gpu>-<date>.json, .md and .png. Exits non-zero if any step failed.
GPU_SUITE_BUDGET_S ?= 360
GPU_PY = $(shell for p in $(PY) $(PYTHON); do $$p -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
	2>/dev/null && { echo $$p; break; }; done)

gpu-suite:
	@test -n "$(GPU_PY)" || { echo "gpu-suite: no CUDA GPU visible to $(PY) or $(PYTHON)" >&2; exit 1; }
	@export PYTHONPATH=. TRITON_INTERPRET=0; failed=0; \
	deadline=$$(( $$(date +%s) + $(GPU_SUITE_BUDGET_S) )); \
	$(GPU_PY) -m pytest -q -m gpu tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || failed=1; \
	$(GPU_PY) -m bench.ledger || failed=1; \
	$(GPU_PY) $(BENCH_PYTEST) --bench-save bench/results --bench-deadline $$deadline || failed=1; \
	exit $$failed

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
