"""Launch-option sweep of every Triton kernel of lfm_kernels at LFM's shapes, on a GPU, separate from the GPU run.

    python -m bench.tune [--budget-s 300] [--table lfm_kernels/tuned_configs.json] [--force]

LFM's workloads (bench.workloads: inference at batch 1 and 256 and 256x256, both kinds of training step at
batch 32 and 224x224, the standalone ops) run once per dtype while every kernel launch is recorded through
lfm_kernels.configs.observe_launches (kernel, grid, arguments, constexprs and compile options). Each recorded
launch is then replayed with each of a few launch options (num_warps x num_stages, SWEPT_OPTIONS), which
change neither the grid nor the results, timed with CUDA events, and the fastest is written to the table
next to the launcher's own time. Tile sizes (the BLOCK_* constexprs) are the launchers' choice: they set the
grid, so a sweep over them has to go through the launchers (see the table format below).

Budgeted and incremental like the GPU run: launches already in the table for this device and triton
version are skipped (unless --force), the table is rewritten after each launch, and no launch starts
when its estimated sweep would pass the budget. Needs a CUDA GPU.

Table (JSON): {"format": 1, "entries": [{"device", "triton", "kernel", "dtype", "constexprs",
"num_warps", "num_stages", "median_ms", "launcher_ms", "launcher_options"}, ...]}; a launcher finds its
entry by (device name, kernel name, dtype of the kernel's first tensor argument, constexprs).
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

from lfm_kernels.configs import TUNED_TABLE, json_constexprs, tuned_key

TABLE = TUNED_TABLE  # lfm_kernels.configs applies its entries over the launch-config table
SWEPT_OPTIONS = [dict(num_warps=w, num_stages=s) for w, s in itertools.product((2, 4, 8), (2, 3, 4))]
TIMED_ROUNDS, CALLS_PER_ROUND = 7, 10
SECONDS_PER_OPTION = 2.0  # compiling one variant (about 1 s) and timing it: the budget's estimate


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


def load_table(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"format": 1, "entries": []}


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
    for dtype in (torch.float32, torch.bfloat16):
        launches = []
        with recording(launches):
            workloads(dtype)
        if not tune(launches, args.table, torch.cuda.get_device_name(), triton.__version__, deadline, args.force):
            print(f"bench.tune: budget spent; run again to go on ({args.table} holds what is done)")
            return 0
        del launches  # frees the recorded arguments (activations at batch 256) before the next dtype
        torch.cuda.empty_cache()
    print(f"bench.tune: every launch is in {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
