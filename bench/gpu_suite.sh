#!/usr/bin/env bash
# The GPU run (bench/gpu_suite.py; make gpu-suite): installs nothing, needs no network. Runs with .venv's
# Python when its torch sees a GPU, else with $PYTHON (default python3) and this checkout on PYTHONPATH.
# Arguments go to bench.gpu_suite (--out DIR, --budget-s S, --tiers ...); so do $GPU_SUITE_OUT,
# $GPU_SUITE_BUDGET_S and $LFM_COMMIT (the commit to record where the checkout has no .git).
export GPU_SUITE_START="${GPU_SUITE_START:-$(date +%s.%N)}"  # the budget counts from here
cd "$(dirname "$0")/.." || exit 1
python="$(bash bench/gpu_python.sh gpu-suite)" || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m bench.gpu_suite "$@"
