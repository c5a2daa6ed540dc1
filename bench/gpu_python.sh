#!/usr/bin/env bash
# Prints the Python that the GPU commands run with: .venv's when its torch sees a CUDA GPU, else $PYTHON
# (default python3) when its torch does; else says so on stderr and exits 1. Argument: the command's name.
cd "$(dirname "$0")/.." || exit 1
for candidate in .venv/bin/python "${PYTHON:-python3}"; do
    if "$candidate" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        echo "$candidate"
        exit 0
    fi
done
echo "${1:-gpu}: no CUDA GPU visible to .venv/bin/python or ${PYTHON:-python3} (torch.cuda.is_available() is False)" >&2
exit 1
