"""Tile and launch-option sweep of the Triton kernels of lfm_kernels at LFM's shapes, on a GPU, apart from the GPU run.

    python -m bench.tune [--budget-s 300] [--table lfm_kernels/tuned_configs.json] [--force]

First the tiles: for each launch-config entry (kernel, dot kind) of TILED_KERNELS that LFM's workloads use,
its tiles, warps and stages and each neighbor (a BLOCK_* doubled or halved, one stage more or fewer, twice or
half the warps) are timed end to end on the goal workloads (inference at batch 256 and 256x256, a training step
at batch 32 and 224x224), with CUDA events, the launchers planning their grids for each
(lfm_kernels.configs.tile_choices). A variant counts only when the outputs of a seeded inference and training
step (logits, every gradient, the running statistics) match the launch config's within VARIANT_TOLERANCE, and
wins only when it beats the current tiles by MIN_GAIN. The winner becomes the current tiles and the climb goes
on from it until the current tiles win or a winner was visited before (the entry is settled); each step is
written to the table, and an entry a run left unsettled goes on from its last winner at the next run. Then the
launches: LFM's workloads (bench.workloads: inference at batch 1 and 256, both kinds of training step, the
standalone ops) run once per dtype with the chosen tiles while every kernel launch is recorded through
lfm_kernels.configs.observe_launches; each recorded launch is replayed with each of a few launch options
(num_warps x num_stages, SWEPT_OPTIONS), which change neither the grid nor the results, and the fastest is
written to the table next to the launcher's own time.

Before a climb step times its variants, and before a launch's options are timed, their kernels are compiled
at once on every core (compile_in_parallel), which would otherwise compile one by one as each first runs.

Budgeted and incremental like the GPU run: settled entries and launches already in the table for this device and
triton version are skipped (unless --force: then every entry climbs again from its launch config), the table is
rewritten after each step, and none starts when its estimated sweep would pass the budget. Needs a CUDA GPU.

Table (JSON): {"format": 1, "tiles": [{"device", "triton", "kernel", "kind", "tiles", "median_ms", "start_tiles",
"start_ms", "table_tiles"}, ...], "entries": [{"device", "triton", "kernel", "dtype", "constexprs", "num_warps",
"num_stages", "median_ms", "launcher_ms", "launcher_options"}, ...]}; launch_config applies the tiles of
(kernel, dot kind) for the GPU over its table while the table's entry is still `table_tiles`, and a launcher
finds its entry by (device name, kernel name, dtype of the kernel's first tensor argument, constexprs).
"""
import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lfm_kernels.configs import (
    TUNED_TABLE,
    configs_given,
    family,
    json_constexprs,
    observe_launches,
    smallest_block,
    table_entry,
    tile_choices,
    tunable,
    tuned_key,
)

TABLE = TUNED_TABLE  # lfm_kernels.configs applies its entries over the launch-config table
SWEPT_OPTIONS = [dict(num_warps=w, num_stages=s) for w, s in itertools.product((2, 4, 8), (2, 3, 4))]
TIMED_ROUNDS, CALLS_PER_ROUND = 7, 10
SECONDS_PER_OPTION = 2.0  # compiling one variant (about 1 s) and timing it: the budget's estimate
# The entries whose tiles are swept, in this order: the GEMM kernels, which took most of the GPU time in the first
# H200 profile (inference, then training); the memory-bound passes keep their launch config's tiles.
TILED_KERNELS = ("snet_block", "snet_head", "snet_block_stats", "snet_block_bwd", "conv2x2_dw", "conv2x2_dx")
DTYPES = (torch.float32, torch.bfloat16)
TILE_ROUNDS = 3  # timed runs of the goal workloads per variant, after one that compiles it
SECONDS_PER_TILES = 5.0  # compiling a variant's kernels, checking its outputs and timing it: the estimate
MIN_GAIN = 0.02  # a variant replaces the current tiles only when it is this much faster (less is noise)
VARIANT_TOLERANCE = 0.1  # norm-relative: far above rounding (TF32, bfloat16, near-tie flips), far below a wrong tile
STAGES, WARPS = (2, 5), (4, 8)  # the ranges of the swept num_stages and num_warps
COMPILE_THREADS = os.cpu_count() or 1  # compile_in_parallel's threads


@dataclass
class Launch:
    kernel: object  # triton JITFunction
    grid: object
    args: tuple
    kwargs: dict

    @classmethod
    def of(cls, observed) -> "Launch":
        """A launch that configs.observe_launches saw."""
        return cls(observed.kernel, observed.grid, observed.args, dict(observed.meta))

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


def launch_on_gpu(launch: Launch) -> bool:
    """Whether a recorded launch's tensors are on a GPU (elsewhere its kernel cannot be compiled by the JIT)."""
    return next(a for a in launch.args if isinstance(a, torch.Tensor)).is_cuda


def entry_key(entry: dict) -> tuple:
    return tuned_key(entry["device"], entry["triton"], entry["kernel"], entry["dtype"], entry["constexprs"])


@contextlib.contextmanager
def recording(launches: list):
    """Append each distinct launch (kernel and constexprs, per dtype) to `launches` while active (the kernels run
    as usual unless an outer configs.observe_launches stubs them out)."""
    seen = set()

    def record(observed):
        launch = Launch.of(observed)
        if launch.key("", "") not in seen:
            seen.add(launch.key("", ""))
            launches.append(launch)

    with observe_launches(record):
        yield


def compile_in_parallel(submit_warmups):
    """Compile at once, on every core, the kernels that submit_warmups(warm_up) hands to warm_up(launch,
    options): each a warm-up of the launch's kernel with its arguments, grid and constexprs and `options` over
    its num_warps/num_stages, under Triton's AsyncCompileMode (compilation releases the GIL; ptxas is a process
    of its own), so that a climb step's variants or a launch's swept options compile together instead of one by
    one as each first runs. Best effort: a kernel that fails to compile here fails again, with its message,
    when it runs. Without AsyncCompileMode (triton before 3.4) each compiles when it first runs."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return

    def warm_up(launch, options):
        launch.kernel.warmup(*launch.args, grid=launch.grid, **{**launch.kwargs, **options})

    with ThreadPoolExecutor(COMPILE_THREADS) as pool, AsyncCompileMode(pool, ignore_errors=True):
        submit_warmups(warm_up)


def precompile_tiles(workloads: "GoalWorkloads", pair: tuple, variants: list, chosen: dict):
    """Compile the kernels of every tile variant of entry `pair` (the others as chosen) in parallel: the goal
    workloads run once per variant with their launches stubbed out, each launch handed to compile_in_parallel."""
    def submit_warmups(warm_up):
        for tiles in variants:
            with tile_choices({**chosen, pair: tiles}), observe_launches(
                    lambda observed: warm_up(Launch.of(observed), {}), run=False):
                try:
                    workloads.run()
                except Exception:  # noqa: BLE001 (time_tiles runs the variant again and reports what fails)
                    continue

    compile_in_parallel(submit_warmups)


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


class GoalWorkloads:
    """LFM's goal workloads on one model in `dtype`: `run()` runs them once (inference at `batch`, 256, and
    256x256; a training step at `train_batch`, 32, and 224x224) on fixed random images; `outputs()` is what
    every tile variant must reproduce."""

    def __init__(self, dtype, device="cuda", batch=None, train_batch=None):
        from bench.shapes import IMAGE_SIZE, LARGE_BATCH, TRAIN_BATCH, TRAIN_SIZE
        from bench.workloads import lfm_model

        self.model = lfm_model(dtype, device)
        self.state = {name: t.clone() for name, t in self.model.state_dict().items()}
        images = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch or LARGE_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=images)
        self.train_images = torch.randn(train_batch or TRAIN_BATCH, 3, TRAIN_SIZE, TRAIN_SIZE, generator=images)
        self.images, self.train_images = (x.to(device, dtype) for x in (self.images, self.train_images))

    def run(self):
        from bench.workloads import training_step

        with torch.no_grad():
            self.model.eval()(self.images)
        training_step(self.model, images=self.train_images)

    def outputs(self) -> dict:
        """From the saved state, with seeded randomness: the inference's logits, then the gradient of every
        parameter and the running statistics after one training step, as float32 copies by name. Leaves the
        model in the saved state without gradients, also when a variant fails midway."""
        from bench.workloads import training_step

        self.model.zero_grad(set_to_none=True)
        self.model.load_state_dict(self.state)
        torch.manual_seed(0)
        try:
            with torch.no_grad():
                result = {"logits": self.model.eval()(self.images).float()}
            training_step(self.model, images=self.train_images, keep_grads=True)
            result |= {f"gradient of {name}": p.grad.detach().float().clone()
                       for name, p in self.model.named_parameters() if p.grad is not None}
            result |= {name: t.detach().float().clone() for name, t in self.model.named_buffers()
                       if t.is_floating_point()}
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.load_state_dict(self.state)
        return result


def not_finite(outputs: dict) -> str:
    """The name of the first output with a NaN or an infinity, else ""."""
    return next((name for name, t in outputs.items() if not torch.isfinite(t).all()), "")


def differs(outputs: dict, reference: dict) -> str:
    """The first output that is not finite or differs from the reference by more than VARIANT_TOLERANCE
    (norm-relative), as a message; "" when none does."""
    if not_finite(outputs):
        return f"{not_finite(outputs)} is not finite"
    for name, ref in reference.items():
        error = ((outputs[name] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if error > VARIANT_TOLERANCE:
            return f"{name} differs from the launch config's by {error:.2g} (norm-relative)"
    return ""


def first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"


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


def config_tiles(kernel: str, kind: str, device) -> dict:
    """The tiles, warps and stages of (kernel, kind)'s entry in the launch-config table for device's family, no
    tuned tiles applied (None for an entry the table no longer has)."""
    try:
        return tunable(table_entry(kernel, kind, family(device)))
    except KeyError:
        return None


def tile_neighbors(kernel: str, tiles: dict) -> list:
    """tiles, then each variant one step away: a BLOCK_* doubled or halved (not under configs.smallest_block),
    one pipeline stage more or fewer (STAGES), twice or half the warps (WARPS)."""
    variants = [dict(tiles)]
    for name, value in tiles.items():
        if name.startswith("BLOCK_"):
            steps, bounds = (value * 2, value // 2), (smallest_block(kernel, name), 1 << 30)
        elif name == "num_stages":
            steps, bounds = (value + 1, value - 1), STAGES
        elif name == "num_warps":
            steps, bounds = (value * 2, value // 2), WARPS
        else:
            continue
        variants += [{**tiles, name: v} for v in steps if bounds[0] <= v <= bounds[1]]
    return variants


def gpu_intact(torch_device: torch.device) -> bool:
    """Whether the GPU still runs work after a variant failed (an illegal address poisons its context)."""
    if torch_device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(torch_device)
        return True
    except RuntimeError:
        return False


def tune_tiles(workloads: GoalWorkloads, dtype, table_path: Path, gpu_name: str, triton_version: str,
               deadline: float, force: bool = False, torch_device: torch.device = torch.device("cuda")) -> tuple:
    """Hill-climb the tiles of each TILED_KERNELS entry that the goal workloads use in dtype on `torch_device`,
    one entry at a time: time the current tiles and their neighbors (tile_neighbors), move to the winner, and
    again until the current tiles win or the winner was visited before (the entry is settled), rewriting the
    table after each step. An entry starts from the table's launch config, or goes on from its last winner on
    this GPU (`gpu_name`) unless it is settled there or its launch config has changed since (with force: from
    the launch config, every entry). A variant counts only when its outputs match the launch config's (tiles
    change code paths, not the math) and wins only when it beats the current tiles by MIN_GAIN (less is
    noise). Returns the choices {(kernel, kind): tiles} this run found or kept, and False when the budget
    stopped it first."""
    table = load_table(table_path)
    mine = (gpu_name, triton_version)
    current = {}  # this GPU's entries, where the launch config is still the one they climbed from
    if not force:
        for e in table.get("tiles", []):
            pair = (e["kernel"], e["kind"])
            if tile_entry_key(e)[:2] == mine and e["table_tiles"] == config_tiles(*pair, torch_device):
                current[pair] = e
    chosen = {pair: e["tiles"] for pair, e in current.items()}
    with tile_choices(chosen):
        workloads.run()  # so that every entry the workloads use has been given out in this process
    used = [pair for pair in configs_given() if pair[0] in TILED_KERNELS and pair[1] in dot_kinds(dtype)]
    for pair in sorted(used, key=lambda pair: (TILED_KERNELS.index(pair[0]), pair)):
        last, config = current.get(pair), config_tiles(*pair, torch_device)
        if last is not None and last["tiles"] == last.get("start_tiles"):
            continue  # settled
        start, visited = (last["tiles"] if last is not None else config), []
        chosen.pop(pair, None)
        with tile_choices({**chosen, pair: config}):
            reference = workloads.outputs()
        if not_finite(reference):
            print(f"{pair[0]} {pair[1]}: left as it is, its launch config gives a {not_finite(reference)} that is "
                  "not finite")
            continue
        others = [e for e in table.get("tiles", []) if tile_entry_key(e) != (*mine, *pair)]
        while True:
            variants = tile_neighbors(pair[0], start)
            if time.time() + SECONDS_PER_TILES * len(variants) > deadline:
                return chosen, False
            visited.append(start)
            if torch_device.type == "cuda":
                precompile_tiles(workloads, pair, variants, chosen)
            timed = time_tiles(workloads, pair, variants, chosen, reference, torch_device, table_path)
            if not timed or timed[0][1] != start:
                print(f"{pair[0]} {pair[1]}: the tiles {start} did not run; the launch config's stand")
                table["tiles"] = others
                write_table(table_path, table)
                break
            start_ms = timed[0][0]
            best_ms, best = min(timed, key=lambda t: t[0])
            if best_ms > start_ms * (1 - MIN_GAIN) or best in visited:
                best_ms, best = start_ms, start  # settled (a winner visited before: noise between two tiles)
            chosen[pair] = best
            entry = dict(device=gpu_name, triton=triton_version, kernel=pair[0], kind=pair[1], tiles=best,
                         median_ms=round(best_ms, 4), start_tiles=start, start_ms=round(start_ms, 4),
                         table_tiles=config)
            table["tiles"] = [*others, entry]
            write_table(table_path, table)
            print(f"{pair[0]} {pair[1]}: goal workloads {start_ms:.3f} ms with {start}, {best_ms:.3f} ms with {best}")
            if best == start:
                break
            start = best
    return chosen, True


def tile_entry_key(entry: dict) -> tuple:
    return entry["device"], entry["triton"], entry["kernel"], entry["kind"]


def time_tiles(workloads: GoalWorkloads, pair: tuple, variants: list, chosen: dict, reference: dict,
               torch_device: torch.device, table_path: Path) -> list:
    """[(ms, tiles)] of the variants of entry `pair` (the others as chosen) whose outputs match the reference;
    raises RuntimeError when a failing variant left the GPU unusable."""
    timed = []
    for tiles in variants:
        with tile_choices({**chosen, pair: tiles}):
            try:
                wrong = differs(workloads.outputs(), reference)
                if wrong:
                    print(f"  {pair[0]} {pair[1]} {tiles}: refused, {wrong}")
                    continue
                timed.append((workload_ms(workloads.run), tiles))
            except Exception as error:  # noqa: BLE001 (tiles can exceed shared memory or registers: skip them)
                print(f"  {pair[0]} {pair[1]} {tiles}: {first_line(error)}")
                if not gpu_intact(torch_device):
                    raise RuntimeError(f"{pair[0]} {pair[1]} {tiles} left the GPU unusable; {table_path} holds "
                                       "what was done before it") from error
    return timed


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
    if launch_on_gpu(launch):
        compile_in_parallel(lambda warm_up: [warm_up(launch, options) for options in SWEPT_OPTIONS])
    launcher_ms = median_launch_ms(launch, {})
    timed = []
    for options in SWEPT_OPTIONS:
        try:
            timed.append((median_launch_ms(launch, options), options))
        except Exception as error:  # noqa: BLE001 (an option can exceed shared memory or registers: skip it)
            print(f"  {options}: {first_line(error)}")
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
    parser.add_argument("--force", action="store_true",
                        help="sweep what the table already has again (tiles from the launch-config table's)")
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
    chosen = {}  # both dtypes' tiles: the launches of each are recorded with all of them
    for dtype in DTYPES:  # tiles first: they set the grids and the constexprs that launch entries are keyed on
        goal = GoalWorkloads(dtype)
        try:
            found, done = tune_tiles(goal, dtype, args.table, name, version, deadline, args.force)
            chosen |= found
        except RuntimeError as error:
            sys.stderr.write(f"bench.tune: {error}\n")
            return 1
        del goal  # the model and its images
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
