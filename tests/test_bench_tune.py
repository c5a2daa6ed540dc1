"""bench.tune without a GPU: it says so and leaves the table alone; the sweep over launches recorded from
every op, with the timing faked, keeps the fastest options once per launch and stops at its budget; the tile
sweep over stubbed goal workloads keeps the fastest neighbor whose outputs match, and launchers take it; the
kernels of a climb step's variants and of a launch's options compile ahead, in parallel, for sm_90."""
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


def test_tile_neighbors_step_each_choice_once_within_bounds():
    from bench.tune import tile_neighbors

    base = dict(BLOCK_M=128, BLOCK_CI=16, num_warps=8, num_stages=2)
    assert tile_neighbors("score_topk_dfeat", base) == [
        base, {**base, "BLOCK_M": 256}, {**base, "BLOCK_M": 64}, {**base, "BLOCK_CI": 32}, {**base, "num_warps": 4},
        {**base, "num_stages": 3}]
    # A conv's channel block is a quarter of its dot's K: it may step down to 4, not under.
    conv = tile_neighbors("snet_block", dict(BLOCK_CI=8, num_warps=4, num_stages=2))
    assert [v["BLOCK_CI"] for v in conv] == [8, 16, 4, 8, 8]
    assert [v["BLOCK_CI"] for v in tile_neighbors("snet_block", dict(BLOCK_CI=4))] == [4, 8]


TILE_SWEEP_ON_STUBBED_WORKLOADS = """
import json, sys, time
from pathlib import Path

import torch

from bench import tune
from bench.workloads import cpu_tensors_take_the_triton_path
from lfm_kernels.configs import gpu_family, observe_launches, tile_choices

table = Path(sys.argv[1])
cpu = torch.device("cpu")


def launched(run):
    metas = []
    with observe_launches(lambda launch: metas.append((launch.name, launch.meta)), run=False):
        run()
    return metas


def deepest_pipeline(run):
    # Faked timing: a launch with more stages is faster; the deepest pipeline of the run decides.
    return 10.0 - max(meta["num_stages"] for _, meta in launched(run))


def outputs(self):
    # Faked outputs: 256-row tiles of the block kernel compute wrongly.
    wrong = any(name == "_snet_block_kernel" and meta["BLOCK_M"] == 256 for name, meta in launched(self.run))
    return {"logits": torch.full((4,), 2.0 if wrong else 1.0)}


def untimed(run):
    raise AssertionError("swept an entry the table already had")


def sweep():
    return tune.tune_tiles(goal, torch.bfloat16, table, "GPU", "3.x", time.time() + 1e6, torch_device=cpu)


def by_entry(text):
    return {(e["kernel"], e["kind"]): e for e in json.loads(text)["tiles"]}


# No GPU here: launches are stubbed out and planned as on an H100/H200, on small CPU tensors.
with observe_launches(run=False), cpu_tensors_take_the_triton_path(), gpu_family("sm90"):
    goal = tune.GoalWorkloads(torch.bfloat16, "cpu", batch=1, train_batch=2)
    tune.workload_ms, tune.GoalWorkloads.outputs = deepest_pipeline, outputs
    chosen, done = tune.tune_tiles(goal, torch.bfloat16, table, "GPU", "3.x", time.time() - 1, torch_device=cpu)
    assert not done and chosen == {} and not table.exists()  # budget spent before the first entry
    chosen, done = sweep()
    assert done
    climbed = table.read_text()
    tune.workload_ms = untimed
    assert sweep()[1] and table.read_text() == climbed  # every entry settled
    # A lease that ended after the block's first step: the next one goes on from there.
    entries = json.loads(climbed)
    block = next(e for e in entries["tiles"] if e["kernel"] == "snet_block")
    block["start_tiles"] = block["table_tiles"]
    block["tiles"] = {**block["table_tiles"], "num_stages": 4}
    table.write_text(json.dumps(entries))
    tune.workload_ms = deepest_pipeline
    chosen, done = sweep()
    assert done and by_entry(table.read_text()) == by_entry(climbed)
    # An entry whose launch config changed since its climb climbs again from the new config.
    entries = json.loads(climbed)
    head = next(e for e in entries["tiles"] if e["kernel"] == "snet_head")
    head["table_tiles"] = {**head["table_tiles"], "BLOCK_P": 2 * head["table_tiles"]["BLOCK_P"]}
    table.write_text(json.dumps(entries))
    timed = []
    tune.workload_ms = lambda run: timed.append(1) or deepest_pipeline(run)
    chosen, done = sweep()
    assert done and timed and by_entry(table.read_text()) == by_entry(climbed)
    with tile_choices(chosen):
        block = [meta for name, meta in launched(goal.run) if name == "_snet_block_kernel"]
print(json.dumps(sorted({meta["num_stages"] for meta in block})))
"""


def test_tile_sweep_climbs_to_the_fastest_tiles_whose_outputs_match_and_launchers_take_them(tmp_path):
    table = tmp_path / "tuned_configs.json"
    out = subprocess.run([sys.executable, "-c", TILE_SWEEP_ON_STUBBED_WORKLOADS, str(table)], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-3000:]
    tiles = {(e["kernel"], e["kind"]): e for e in json.loads(table.read_text())["tiles"]}
    assert {("snet_block", "16-bit"), ("snet_head", "16-bit"), ("snet_block_bwd", "16-bit")} <= set(tiles)
    assert all(kind == "16-bit" for _, kind in tiles)
    for entry in tiles.values():
        assert entry["tiles"] == entry["start_tiles"] and entry["median_ms"] == entry["start_ms"]  # settled
        assert (entry["device"], entry["triton"]) == ("GPU", "3.x")
    block = tiles["snet_block", "16-bit"]
    # Climbed 3 -> 4 -> 5 stages, the most tried; the wrong 256-row tiles refused at each step.
    assert block["table_tiles"]["num_stages"] == 3 and block["tiles"]["num_stages"] == 5
    assert block["tiles"]["BLOCK_M"] != 256 and out.stdout.count("refused, logits differs") >= 2
    assert json.loads(out.stdout.splitlines()[-1]) == [5]  # the launchers plan with the chosen tiles


def test_goal_outputs_are_copies_from_the_saved_state_and_leave_it_there(monkeypatch):
    import torch

    from bench import tune, workloads
    from lfm import LFM

    monkeypatch.setattr(workloads, "lfm_model",
                        lambda dtype, device: LFM(backend="torch", random_k_weight=0.02).to(device, dtype))
    goal = tune.GoalWorkloads(torch.float32, "cpu", batch=1, train_batch=2)
    first, second = goal.outputs(), goal.outputs()
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    mean = "cnn.layer2.1.running_mean"
    assert not torch.equal(first[mean], goal.state[mean])  # after the training step, not the saved statistics
    assert torch.equal(goal.model.state_dict()[mean], goal.state[mean])  # the model is back in the saved state
    assert "gradient of cnn.layer2.0.weight" in first and all(p.grad is None for p in goal.model.parameters())


PARALLEL_COMPILE = """
import json

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from bench import tune
from bench.workloads import cpu_tensors_take_the_triton_path
from lfm_kernels.configs import gpu_family, observe_launches, tile_choices


class CompileOnlyDriver:
    # No GPU here: the JIT compiles for an H100/H200 (sm_90); nothing is launched.
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def warm_up(observed):
    observed.kernel.warmup(*observed.args, grid=observed.grid, **observed.meta)


driver.set_active(CompileOnlyDriver())
compiled = []
knobs.runtime.jit_post_compile_hook = lambda **kwargs: compiled.append(kwargs["fn"].name)
pair = ("snet_block", "16-bit")
with cpu_tensors_take_the_triton_path(), gpu_family("sm90"):
    goal = tune.GoalWorkloads(torch.bfloat16, "cpu", batch=1, train_batch=2)
    variants = tune.tile_neighbors("snet_block", tune.config_tiles(*pair, torch.device("cpu")))[:3]
    tune.precompile_tiles(goal, pair, variants, {})
    ahead = list(compiled)
    for tiles in variants:  # each variant as the climb runs it: its kernels are compiled already
        with tile_choices({pair: tiles}), observe_launches(warm_up, run=False):
            goal.run()
    after_tiles = len(compiled)
    launches = []
    with tune.recording(launches), observe_launches(run=False):
        goal.run()
    block = next(launch for launch in launches if launch.kernel.fn.__name__ == "_snet_block_kernel")
    tune.compile_in_parallel(lambda warm_up: [warm_up(block, options) for options in tune.SWEPT_OPTIONS])
    options_ahead = len(compiled) - after_tiles
    for options in tune.SWEPT_OPTIONS:
        block.kernel.warmup(*block.args, grid=block.grid, **{**block.kwargs, **options})
print(json.dumps([ahead, after_tiles, options_ahead, len(compiled) - after_tiles]))
"""


@pytest.mark.slow  # compiles about 40 kernels for sm_90
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="triton's CUDA toolchain ships for Linux")
def test_variants_and_options_compile_ahead_in_parallel():
    from bench.tune import SWEPT_OPTIONS

    out = subprocess.run([sys.executable, "-c", PARALLEL_COMPILE], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-3000:]
    ahead, after_tiles, options_ahead, options_total = json.loads(out.stdout.splitlines()[-1])
    # The block kernel once per variant (blocks 2 and 3 share their tiles' kernel), the rest of the workloads
    # once; nothing compiled again when the variants ran.
    assert ahead.count("_snet_block_kernel") >= 3 and "_snet_head_partial_kernel" in ahead
    assert after_tiles == len(ahead)
    # The options that are not the launch's own, each compiled once, ahead.
    assert options_ahead == options_total and options_ahead >= len(SWEPT_OPTIONS) - 1
