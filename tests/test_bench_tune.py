"""bench.tune without a GPU: it says so and leaves the table alone; the sweep over launches recorded from
every op, with the timing faked, keeps the fastest options once per launch and stops at its budget."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_tune_needs_a_gpu_and_says_so(tmp_path):
    table = tmp_path / "tuned_configs.json"
    out = subprocess.run([sys.executable, "-m", "bench.tune", "--table", str(table)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "needs a CUDA GPU" in out.stderr
    assert not table.exists()


SWEEP_ON_RECORDED_LAUNCHES = """
import json, sys, time
from pathlib import Path

import torch

from bench import tune
from bench.workloads import cpu_tensors_take_the_triton_path, lfm_workloads
from lfm_kernels.configs import observe_launches

launches = []
# No GPU here: launches are stubbed out (run=False) and only recorded; LFM's workloads on small CPU tensors.
with observe_launches(run=False), cpu_tensors_take_the_triton_path(), tune.recording(launches):
    lfm_workloads(torch.bfloat16, "cpu", eval_batches=(1,), train_batch=2, op_batch=2)
# Timings that favour 8 warps and 2 stages; the launcher's own options time 1 ms.
tune.median_launch_ms = lambda launch, options: 1.0 / options.get("num_warps", 1) + 0.01 * options.get("num_stages", 0)
table = Path(sys.argv[1])
assert tune.tune(launches, table, "GPU", "3.x", deadline=time.time() + 1e6)
first = table.read_text()


def untimed(launch, options):
    raise AssertionError("swept a launch the table already had")


tune.median_launch_ms = untimed
assert tune.tune(launches, table, "GPU", "3.x", deadline=time.time() + 1e6) and table.read_text() == first
assert not tune.tune(launches, table, "GPU", "3.x", deadline=time.time(), force=True)  # budget spent first
print(json.dumps([len(launches), {launch.kernel.fn.__name__: launch.dtype for launch in launches}]))
"""


@pytest.mark.slow  # records every launch of the workloads
def test_sweep_writes_each_launch_once_with_its_fastest_options(tmp_path):
    table = tmp_path / "tuned_configs.json"
    out = subprocess.run([sys.executable, "-c", SWEEP_ON_RECORDED_LAUNCHES, str(table)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-3000:]
    launch_count, kernel_dtypes = json.loads(out.stdout.splitlines()[-1])
    assert {"_npr_residual_fwd_kernel", "_topk_chunk_kernel", "_snet_block_kernel", "_snet_stem_kernel",
            "_snet_head_partial_kernel", "_snet_block_dz_kernel"} <= set(kernel_dtypes)
    assert kernel_dtypes["_snet_block_kernel"] == "bfloat16"
    entries = json.loads(table.read_text())["entries"]
    assert len(entries) == launch_count and {e["kernel"] for e in entries} == set(kernel_dtypes)
    for entry in entries:
        assert (entry["num_warps"], entry["num_stages"], entry["median_ms"]) == (8, 2, 0.145)
        assert entry["launcher_ms"] == 1.0 and entry["device"] == "GPU" and entry["triton"] == "3.x"
