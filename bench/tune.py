"""Launch-option sweep of every Triton kernel of lfm_kernels at LFM's shapes, on a GPU, separate from the GPU run.

    python -m bench.tune [--budget-s 300] [--table lfm_kernels/tuned_configs.json] [--force]

First the tiles: for each launch-config entry (kernel, dot kind) of TILED_KERNELS that LFM's workloads use,
its tiles, warps and stages and each neighbor (a BLOCK_* doubled or halved, one stage more or fewer, twice or
half the warps) are timed end to end on the goal workloads (inference at batch 256 and 256x256, a training step
at batch 32 and 224x224, bench.workloads), with CUDA events, the launchers planning their grids for each
(lfm_kernels.configs.tile_choices); the fastest is kept for the next entry and written to the table. Then the
launches: LFM's workloads (bench.workloads: inference at batch 1 and 256, both kinds of training step, the
standalone ops) run once per dtype with the chosen tiles while every kernel launch is recorded through
lfm_kernels.configs.observe_launches; each recorded launch is replayed with each of a few launch options
(num_warps x num_stages, SWEPT_OPTIONS), which change neither the grid nor the results, and the fastest is
written to the table next to the launcher's own time.

Budgeted and incremental like the GPU run: entries and launches already in the table for this device and triton
version are skipped (unless --force), the table is rewritten after each, and none starts when its estimated
sweep would pass the budget. Needs a CUDA GPU.

Table (JSON): {"format": 1, "tiles": [{"device", "triton", "kernel", "kind", "tiles", "median_ms", "table_ms",
"table_tiles"}, ...], "entries": [{"device", "triton", "kernel", "dtype", "constexprs", "num_warps",
"num_stages", "median_ms", "launcher_ms", "launcher_options"}, ...]}; launch_config applies the tiles of
(kernel, dot kind) for the GPU over its table, and a launcher finds its entry by (device name, kernel name,
dtype of the kernel's first tensor argument, constexprs).
"""
import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lfm_kernels.configs import TUNED_TABLE, configs_given, json_constexprs, launch_config, tile_choices, tuned_key

TABLE = TUNED_TABLE  # lfm_kernels.configs applies its entries over the launch-config table
SWEPT_OPTIONS = [dict(num_warps=w, num_stages=s) for w, s in itertools.product((2, 4, 8), (2, 3, 4))]
TIMED_ROUNDS, CALLS_PER_ROUND = 7, 10
SECONDS_PER_OPTION = 2.0  # compiling one variant (about 1 s) and timing it: the budget's estimate
# The entries whose tiles are swept, in this order: the GEMM kernels, which took most of the GPU time in the first
# H200 profile (inference, then training); the memory-bound passes keep the table's tiles.
TILED_KERNELS = ("snet_block", "snet_head", "snet_block_stats", "snet_block_bwd", "conv2x2_dw", "conv2x2_dx")
DTYPES = (torch.float32, torch.bfloat16)
TILE_ROUNDS = 3  # timed runs of the goal workloads per variant, after one that compiles it
SECONDS_PER_TILES = 5.0  # compiling a variant's kernels and running the goal workloads 4 times: the estimate
STAGES, WARPS = (2, 5), (4, 8)  # the ranges of the swept num_stages and num_warps


@dataclass
class Launch:
    kernel: object  # triton JITFunction
    grid: object
    args: tuple
    kwargs: dict

    @property
    def dtype(self) -> str:
        """The dtype of the first tensor argument: with the constexprs, what a launcher knows when it launches."""
        first = next(a for a in self.args if isinstance(a, torch.Tensor))
        return str(first.dtype).removeprefix("torch.")

    @property
    def constexprs(self) -> dict:
        """The launch's constexprs as JSON values (a tl.dtype by its name)."""
        names = {p.name for p in self.kernel.params if p.is_constexpr}
        return json_constexprs({k: v for k, v in self.kwargs.items() if k in names})

    def key(self, device: str, triton_version: str) -> tuple:
        return tuned_key(device, triton_version, self.kernel.fn.__name__, self.dtype, self.constexprs)


def entry_key(entry: dict) -> tuple:
    return tuned_key(entry["device"], entry["triton"], entry["kernel"], entry["dtype"], entry["constexprs"])


@contextlib.contextmanager
def recording(launches: list):
    """Append each distinct launch (kernel and constexprs, per dtype) to `launches` while active (the kernels run
    as usual unless an outer configs.observe_launches stubs them out)."""
    from lfm_kernels.configs import observe_launches

    seen = set()

    def record(observed):
        launch = Launch(observed.kernel, observed.grid, observed.args, dict(observed.meta))
        if launch.key("", "") not in seen:
            seen.add(launch.key("", ""))
            launches.append(launch)

    with observe_launches(record):
        yield


def workloads(dtype):
    """LFM's Triton launches at its shapes in dtype on the GPU (bench.workloads), then a synchronize."""
    from bench.workloads import lfm_workloads

    lfm_workloads(dtype, "cuda")
    torch.cuda.synchronize()


def median_launch_ms(launch: Launch, options: dict) -> float:
    """Median over rounds of CALLS_PER_ROUND back-to-back launches with `options`, in ms per launch."""
    kwargs = dict(launch.kwargs, **options)

    def call():
        launch.kernel[launch.grid](*launch.args, **kwargs)

    call()  # compiles this variant
    times = []
    for _ in range(TIMED_ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS_PER_ROUND):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS_PER_ROUND)
    return statistics.median(times)


def goal_workload(dtype, device="cuda", batch=None, train_batch=None):
    """A function that runs the goal workloads once: LFM inference at `batch` (256) and 256x256, and a training
    step at `train_batch` (32) and 224x224, on one model in `dtype`."""
    from bench.shapes import LARGE_BATCH, TRAIN_BATCH
    from bench.workloads import inference, lfm_model, training_step

    model = lfm_model(dtype, device)

    def run():
        inference(model, batch or LARGE_BATCH)
        training_step(model, train_batch or TRAIN_BATCH)

    return run


def workload_ms(run) -> float:
    """Median over TILE_ROUNDS of run()'s time in ms (CUDA events), after one run that compiles what changed."""
    run()
    times = []
    for _ in range(TILE_ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def dot_kinds(dtype) -> tuple:
    """The dot kinds (lfm_kernels.configs.dot_kind) of a dtype's launches: float32 runs TF32 and, in the stem,
    full float32."""
    return ("tf32", "ieee") if dtype == torch.float32 else ("16-bit",)


def table_tiles(kernel: str, kind: str, dtype, device) -> dict:
    """The tiles, warps and stages that launch_config gives (kernel, kind) now (under tile_choices)."""
    config = launch_config(kernel, device, dtype, "tf32" if kind == "16-bit" else kind)
    return {k: v for k, v in config.items() if k.startswith("BLOCK_") or k in ("num_warps", "num_stages")}


def tile_neighbors(tiles: dict) -> list:
    """tiles, then each variant one step away: a BLOCK_* doubled or halved (not under 16, tl.dot's least), one
    pipeline stage more or fewer (STAGES), twice or half the warps (WARPS)."""
    variants = [dict(tiles)]
    for name, value in tiles.items():
        if name == "num_stages":
            steps, bounds = (value + 1, value - 1), STAGES
        else:
            steps, bounds = (value * 2, value // 2), (16, 1 << 30) if name.startswith("BLOCK_") else WARPS
        variants += [{**tiles, name: v} for v in steps if bounds[0] <= v <= bounds[1]]
    return variants


def tune_tiles(run, dtype, table_path: Path, device: str, triton_version: str, deadline: float, force: bool = False,
               on: torch.device = torch.device("cuda")) -> tuple:
    """Sweep the tiles of each launch-config entry that run() uses in dtype on the torch device `on` (all with
    force, else those the table lacks for GPU `device`), rewriting the table after each; returns the choices
    {(kernel, kind): tiles} now in force and False when the budget stopped it first."""
    table = load_table(table_path)
    mine = lambda e: e["device"] == device and e["triton"] == triton_version  # noqa: E731
    chosen = {(e["kernel"], e["kind"]): e["tiles"] for e in table.get("tiles", []) if mine(e)}
    swept = set() if force else set(chosen)
    with tile_choices(chosen):
        run()  # launch plans made again under these choices: configs_given names every entry the workloads use
        used = [pair for pair in configs_given() if pair[0] in TILED_KERNELS and pair[1] in dot_kinds(dtype)]
    for kernel, kind in sorted(used, key=lambda pair: (TILED_KERNELS.index(pair[0]), pair)):
        if (kernel, kind) in swept:
            continue
        with tile_choices(chosen):
            base = table_tiles(kernel, kind, dtype, on)
        variants = tile_neighbors(base)
        if time.time() + SECONDS_PER_TILES * len(variants) > deadline:
            return chosen, False
        timed = []
        for tiles in variants:
            with tile_choices({**chosen, (kernel, kind): tiles}):
                try:
                    timed.append((workload_ms(run), tiles))
                except Exception as error:  # noqa: BLE001 (tiles can exceed shared memory or registers: skip them)
                    print(f"  {kernel} {kind} {tiles}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
        if not timed or timed[0][1] != base:
            print(f"{kernel} {kind}: the table's tiles {base} did not run; left as they are")
            continue
        best_ms, best = min(timed, key=lambda t: t[0])
        chosen[(kernel, kind)] = best
        entry = dict(device=device, triton=triton_version, kernel=kernel, kind=kind, tiles=best,
                     median_ms=round(best_ms, 4), table_ms=round(timed[0][0], 4), table_tiles=base)
        same = lambda e: mine(e) and (e["kernel"], e["kind"]) == (kernel, kind)  # noqa: E731
        table["tiles"] = [e for e in table.get("tiles", []) if not same(e)] + [entry]
        write_table(table_path, table)
        print(f"{kernel} {kind}: goal workloads {entry['table_ms']:.3f} ms with the table's tiles {base}, "
              f"{entry['median_ms']:.3f} ms with {best}")
    return chosen, True


def load_table(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"format": 1, "tiles": [], "entries": []}


def write_table(path: Path, table: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a kill leaves the previous table or the new one


def sweep(launch: Launch, device: str, triton_version: str) -> dict:
    """The launcher's time and the fastest of SWEPT_OPTIONS for one launch, as a table entry."""
    launcher_options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    launcher_ms = median_launch_ms(launch, {})
    timed = []
    for options in SWEPT_OPTIONS:
        try:
            timed.append((median_launch_ms(launch, options), options))
        except Exception as error:  # noqa: BLE001 (an option can exceed shared memory or registers: skip it)
            print(f"  {options}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    best_ms, best = min(timed, key=lambda t: t[0])
    return dict(device=device, triton=triton_version, kernel=launch.kernel.fn.__name__, dtype=launch.dtype,
                constexprs=launch.constexprs, **best, median_ms=round(best_ms, 5), launcher_ms=round(launcher_ms, 5),
                launcher_options=launcher_options)


def tune(launches, table_path: Path, device: str, triton_version: str, deadline: float, force: bool = False) -> bool:
    """Sweep each launch the table lacks (all with force), rewriting the table after each; False when the
    budget stops it first."""
    table = load_table(table_path)
    estimate_s = SECONDS_PER_OPTION * (len(SWEPT_OPTIONS) + 1)
    for launch in launches:
        key = launch.key(device, triton_version)
        if not force and any(entry_key(e) == key for e in table["entries"]):
            continue
        if time.time() + estimate_s > deadline:
            return False
        entry = sweep(launch, device, triton_version)
        table["entries"] = [e for e in table["entries"] if entry_key(e) != key] + [entry]
        write_table(table_path, table)
        print(f"{entry['kernel']} {entry['dtype']} {entry['constexprs']}: launcher {entry['launcher_ms']:.4f} ms "
              f"{entry['launcher_options']}, best {entry['median_ms']:.4f} ms num_warps={entry['num_warps']} "
              f"num_stages={entry['num_stages']}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=300.0, help="seconds for the whole sweep (default 300)")
    parser.add_argument("--table", type=Path, default=TABLE, help=f"the table to update (default {TABLE})")
    parser.add_argument("--force", action="store_true", help="sweep launches that the table already has again")
    args = parser.parse_args(argv)
    deadline = time.time() + args.budget_s
    if not torch.cuda.is_available():
        sys.stderr.write("bench.tune: needs a CUDA GPU (torch.cuda.is_available() is False)\n")
        return 1
    import triton

    if args.budget_s <= 0:  # gpu_session.sh gives what the GPU run left; recording alone takes seconds
        print(f"bench.tune: no budget left; run again to go on ({args.table} holds what is done)")
        return 0
    name, version = torch.cuda.get_device_name(), triton.__version__
    chosen = {}
    for dtype in DTYPES:  # tiles first: they set the grids and the constexprs that launch entries are keyed on
        run = goal_workload(dtype)
        chosen, done = tune_tiles(run, dtype, args.table, name, version, deadline, args.force)
        del run  # the model and its activations
        torch.cuda.empty_cache()
        if not done:
            print(f"bench.tune: budget spent; run again to go on ({args.table} holds what is done)")
            return 0
    for dtype in DTYPES:
        launches = []
        with tile_choices(chosen), recording(launches):
            workloads(dtype)
        if not tune(launches, args.table, name, version, deadline, args.force):
            print(f"bench.tune: budget spent; run again to go on ({args.table} holds what is done)")
            return 0
        del launches  # frees the recorded arguments (activations at batch 256) before the next dtype
        torch.cuda.empty_cache()
    print(f"bench.tune: every launch is in {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
