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

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
