#!/usr/bin/env bash
# The GPU run (bench/gpu_suite.py; make gpu-suite): installs nothing, needs no network. Runs with .venv's
# Python when its torch sees a GPU, else with $PYTHON (default python3) and this checkout on PYTHONPATH.
# Arguments go to bench.gpu_suite (--out DIR, --budget-s S, --tiers ...); so do $GPU_SUITE_OUT,
# $GPU_SUITE_BUDGET_S and $LFM_COMMIT (the commit to record where the checkout has no .git).
export GPU_SUITE_START="${GPU_SUITE_START:-$(date +%s.%N)}"  # the budget counts from here
cd "$(dirname "$0")/.." || exit 1
python=""
for candidate in .venv/bin/python "${PYTHON:-python3}"; do
    if "$candidate" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        python="$candidate"
        break
    fi
done
if [ -z "$python" ]; then
    echo "gpu-suite: no CUDA GPU visible to .venv/bin/python or ${PYTHON:-python3} (torch.cuda.is_available() is False)" >&2
    exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m bench.gpu_suite "$@"
