"""bench.tune without a GPU: it says so and leaves the table alone (the sweep itself needs CUDA events)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tune_needs_a_gpu_and_says_so(tmp_path):
    table = tmp_path / "tuned_configs.json"
    out = subprocess.run([sys.executable, "-m", "bench.tune", "--table", str(table)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "needs a CUDA GPU" in out.stderr
    assert not table.exists()
