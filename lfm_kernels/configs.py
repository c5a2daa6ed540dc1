"""Launch configurations of every kernel in one table: tile sizes, warps and pipeline stages.

Keyed by kernel, by the kind of dot it runs ("16-bit" operands, "tf32", or "ieee" full float32 on
FMA units) and by GPU family: "sm80" (sm_80 to sm_89: mma.sync tensor cores) and "sm90" (sm_90 and
later: wgmma, which Triton emits for tiles of at least 64 rows). "*" matches any kind or family.
Every entry compiles for its family with triton 3.9 and with triton 3.6 (the GPU machines' version; it
refuses dots with K < 16); `python -m bench.compile_report` reports registers, spills, the wgmma shape
and the pipelining of each, and fails where a conv on tensor cores gets no wgmma on sm_90.

This module is the one launch policy: `launch_config` gives a launch its tiles (fitted to the
extents it is given), warps, stages and floating-point fusion; under the interpreter it scales tiles
up (results never depend on tiles); `gpu_family` and `gpu_tile_sizes` make a CPU run launch as a
GPU family would. Every kernel runs through `launch`, which `observe_launches` lets tools watch
(the compile report, the byte ledger, host-time benchmarks, tests) or stub out. `python -m bench.tune`
times tiles on a GPU (through `tile_choices`, so that launchers plan their grids for them), then
num_warps x num_stages per launch, and writes its winners to tuned_configs.json beside this file;
`launch_config` applies the tiles and `tuned_options` the per-launch options over the table, on that GPU
with that triton only. The compile report checks the table's entries, not a GPU's tuned tiles.
"""
import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

FAMILIES = ("sm80", "sm90")
# SMs of the GPU each family is planned for (A100; H100/H200): the programs a launch needs to give every
# SM work when the launch runs as that family without a GPU (the compile report, the interpreter's GPU tiles).
FAMILY_SMS = {"sm80": 108, "sm90": 132}
TUNED_TABLE = Path(__file__).with_name("tuned_configs.json")
# Which path backend="auto" takes on a GPU, per op, family, mode and dtype, where the latest GPU run measured
# ours slower than the cuDNN composition (python -m bench.auto_backend writes it from a GPU run's results).
AUTO_TABLE = Path(__file__).with_name("auto_backend.json")

_CONFIGS = {
    # The SNet blocks' implicit GEMM (conv2x2.conv_tile): [BLOCK_M pixels (BLOCK_M // 4 whole pool windows),
    # BLOCK_CO channels] accumulator, K in steps of 4 taps x BLOCK_CI channels (one dot each), num_stages steps
    # in flight (each step's A and B tiles take shared memory: BLOCK_CI is what keeps 3 stages within sm_90's
    # 228 KB). 128-row tiles with N = 128 give wide wgmma; full-float32 ("ieee") dots run on FMA units, which
    # hold a dot's operands in registers: K = 16 a step (BLOCK_CI = 4) keeps them there on sm_80.
    "snet_block": {
        ("16-bit", "*"): dict(BLOCK_M=128, BLOCK_CI=32, BLOCK_CO=128, num_warps=8, num_stages=3),
        ("tf32", "*"): dict(BLOCK_M=128, BLOCK_CI=16, BLOCK_CO=128, num_warps=8, num_stages=3),
        ("ieee", "*"): dict(BLOCK_M=64, BLOCK_CI=4, BLOCK_CO=64, num_warps=4, num_stages=2),
    },
    # The stem: float32 FMAs over K = 12 (no dot), bound by its output bytes; 32 windows x 64 channels.
    "snet_stem": {("*", "*"): dict(BLOCK_M=128, BLOCK_CO=64, num_warps=4, num_stages=1)},
    # The backward passes hold more live tiles (zhat, dy, the gradient and argmax loads): narrower channels.
    "snet_block_bwd": {
        ("16-bit", "*"): dict(BLOCK_M=128, BLOCK_CI=32, BLOCK_CO=64, num_warps=8, num_stages=3),
        ("tf32", "*"): dict(BLOCK_M=128, BLOCK_CI=16, BLOCK_CO=64, num_warps=8, num_stages=3),
        ("ieee", "*"): dict(BLOCK_M=64, BLOCK_CI=4, BLOCK_CO=32, num_warps=4, num_stages=2),
    },
    # Memory-bound passes over a stored conv map (training): BatchNorm + ReLU + pool of the forward, and the
    # backward's pass from the output gradient to d(conv out). Rows are contiguous runs of channels.
    "snet_block_apply": {("*", "*"): dict(BLOCK_M=128, BLOCK_CO=64, num_warps=4, num_stages=1)},
    "snet_block_dz": {("*", "*"): dict(BLOCK_M=128, BLOCK_CO=64, num_warps=8, num_stages=1)},
    # The stem's backward in one pass (conv, d(conv out), weight gradient as Cin x 4 column reductions, all
    # float32 FMAs): 64 windows a program keep its weight-gradient partials small (19 MB at batch 32, 224x224;
    # 24 bytes of stack on sm_90, where 128 rows at 8 warps spill 700).
    "snet_stem_wgrad": {("*", "*"): dict(BLOCK_M=256, BLOCK_CO=64, num_warps=8, num_stages=1)},
    # Block 4 + scoring: the block-4 GEMM tile [BLOCK_P positions, BLOCK_C4] (conv2x2.conv_tile) feeds the
    # scoring GEMM [BLOCK_P, BLOCK_CS] on chip; C4 blocks one after another. Two accumulators live at once:
    # BLOCK_C4 = 64 keeps them in registers. TF32: K steps of 32 (4 stages) leave the load addresses more room
    # (steps of 64 spilled 112-120 bytes under triton 3.9, 32-56 at 32; 0-8 under triton 3.6).
    "snet_head": {
        ("16-bit", "*"): dict(BLOCK_P=128, BLOCK_CI=32, BLOCK_C4=64, BLOCK_CS=64, num_warps=8, num_stages=3),
        ("tf32", "*"): dict(BLOCK_P=128, BLOCK_CI=8, BLOCK_C4=64, BLOCK_CS=64, num_warps=8, num_stages=4),
        ("ieee", "*"): dict(BLOCK_P=64, BLOCK_CI=4, BLOCK_C4=32, BLOCK_CS=64, num_warps=4, num_stages=2),
    },
    # d(conv input): the implicit GEMM [BLOCK_P pixels, BLOCK_CI] over K = 4 taps x BLOCK_CO a step; K steps of
    # 64 keep 3 stages of float32 A and B tiles within sm_90's 228 KB (full float32: 16, as the blocks).
    "conv2x2_dx": {
        ("ieee", "*"): dict(BLOCK_P=64, BLOCK_CI=64, BLOCK_CO=4, num_warps=4, num_stages=2),
        ("*", "*"): dict(BLOCK_P=128, BLOCK_CI=128, BLOCK_CO=16, num_warps=8, num_stages=3),
    },
    # d(conv weight): [BLOCK_CO, BLOCK_CI] per tap, K = positions in steps of BLOCK_P, split-K over positions
    # (at most MAX_SPLITS partials, summed in a fixed order). 16-bit: one warpgroup a program, as triton 3.6's
    # ptxas serializes the 128x128 tile's wgmma at 8 warps (its C7515 advisory) and keeps it in flight at 4.
    "conv2x2_dw": {
        ("ieee", "*"): dict(BLOCK_P=32, BLOCK_CI=64, BLOCK_CO=64, MAX_SPLITS=64, num_warps=4, num_stages=2),
        ("tf32", "*"): dict(BLOCK_P=32, BLOCK_CI=128, BLOCK_CO=128, MAX_SPLITS=64, num_warps=8, num_stages=4),
        ("16-bit", "*"): dict(BLOCK_P=64, BLOCK_CI=128, BLOCK_CO=128, MAX_SPLITS=64, num_warps=4, num_stages=3),
    },
    # Scoring + Top-K candidates: [BLOCK_CO, BLOCK_N positions] score tile; full-float32 dots: narrower K.
    "score_topk_chunk": {
        ("ieee", "*"): dict(BLOCK_N=128, BLOCK_CI=16, BLOCK_CO=64, num_warps=8, num_stages=3),
        ("*", "*"): dict(BLOCK_N=128, BLOCK_CI=32, BLOCK_CO=64, num_warps=8, num_stages=3),
    },
    # d(feat) [BLOCK_CI, BLOCK_N positions] over K = score channels: 64 rows per warpgroup (4 warps) is
    # what sm_90 needs for wgmma (32 rows ran TF32 on mma.sync); 64x64x8 (TF32) and 64x64x16 (16-bit), no spills.
    "score_topk_dfeat": {
        ("ieee", "*"): dict(BLOCK_N=64, BLOCK_CI=32, BLOCK_CO=32, num_warps=8, num_stages=3),
        ("*", "*"): dict(BLOCK_N=64, BLOCK_CI=64, BLOCK_CO=32, num_warps=4, num_stages=3),
    },
    "score_topk_dweight": {("*", "*"): dict(BLOCK_CI=128, num_warps=4, num_stages=3)},
    # Partials of split reductions summed in order: [BLOCK_P partials, BLOCK_N contiguous sums] a step; the
    # batch statistics' merge likewise over [BLOCK_P programs, BLOCK_C channels]. Each program reads every
    # partial of its outputs (thousands of programs' rows in training), so the launchers narrow BLOCK_N and
    # BLOCK_C (down to 4) until every SM has a program, BLOCK_P growing as they narrow
    # (conv2x2.reduction_tiles).
    "sum_partials": {("*", "*"): dict(BLOCK_P=64, BLOCK_N=128, num_warps=4, num_stages=2)},
    "merge_batch_stats": {("*", "*"): dict(BLOCK_P=32, BLOCK_C=128, num_warps=4, num_stages=2)},
    # Selection: about TILE_ELEMENTS [rows, positions] per program; a row up to WHOLE_ROW positions is one
    # chunk, longer rows go in chunks of CHUNK (k rounds of max per chunk).
    "topk": {("*", "*"): dict(TILE_ELEMENTS=1024, CHUNK=1024, WHOLE_ROW=4096, num_warps=4, num_stages=3)},
    "npr_residual": {("*", "*"): dict(BLOCK=512, num_warps=4, num_stages=3)},
}
_CONFIGS["snet_block_stats"] = _CONFIGS["snet_block"]  # training statistics: the same GEMM, a reduction epilogue

# Channel blocks of the 2x2 convs' K steps (conv2x2.conv_tile, the input gradient): one dot takes the 4 taps of
# the block, so a block of 4 already gives tl.dot its least K of 16. Every other BLOCK_* is a dot's extent.
_TAP_BLOCKS = {("snet_block", "BLOCK_CI"), ("snet_block_stats", "BLOCK_CI"), ("snet_block_bwd", "BLOCK_CI"),
               ("snet_head", "BLOCK_CI"), ("conv2x2_dx", "BLOCK_CO")}

# Floating-point fusion (a*b+c as one FMA, rounded once) for every launch, passed explicitly so that a new
# Triton default cannot change our numerics silently.
FP_FUSION = True

# The interpreter pays per operation, not per element: row tiles it takes instead of the table's (channel
# tiles get 4x the table's cap in launch_config).
_INTERPRETER_ROWS = {"snet_block": ("BLOCK_M", 1024), "snet_stem": ("BLOCK_M", 1024),
                     "snet_block_stats": ("BLOCK_M", 1024), "snet_block_bwd": ("BLOCK_M", 1024),
                     "snet_block_apply": ("BLOCK_M", 1024), "snet_block_dz": ("BLOCK_M", 1024),
                     "snet_stem_wgrad": ("BLOCK_M", 1024),
                     "snet_head": ("BLOCK_P", 512), "conv2x2_dx": ("BLOCK_P", 512), "conv2x2_dw": ("BLOCK_P", 512),
                     "topk": ("TILE_ELEMENTS", 16384), "sum_partials": ("BLOCK_P", 256),
                     "merge_batch_stats": ("BLOCK_P", 256)}

_forced_family = None
_gpu_tiles_in_interpreter = False
_tile_choices = None  # set by tile_choices: ((kernel, kind, ((name, value), ...)), ...), else None
_configs_given = set()  # (kernel, kind) of every launch_config asked for in this process


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET is set now (read at call time: then backend="triton" accepts CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton reads TRITON_INTERPRET when it decorates a kernel, at import, so whether our kernels run in the
# interpreter is fixed for the process: the launch policy follows that, not the variable's value per launch.
KERNELS_INTERPRETED = interpreter_enabled()


@contextlib.contextmanager
def gpu_tile_sizes():
    """Run the interpreter with the tile sizes a GPU gets, so tests cover the code paths of GPU tiles
    (more programs, loops over channel blocks) and not only the interpreter's larger tiles."""
    global _gpu_tiles_in_interpreter
    previous, _gpu_tiles_in_interpreter = _gpu_tiles_in_interpreter, True
    try:
        yield
    finally:
        _gpu_tiles_in_interpreter = previous


@contextlib.contextmanager
def gpu_family(name: str):
    """Launch as a GPU of family `name` would (the compile report records each family's launches)."""
    global _forced_family
    if name not in FAMILIES:
        raise ValueError(f"GPU family must be one of {FAMILIES}, got {name!r}")
    previous, _forced_family = _forced_family, name
    try:
        yield
    finally:
        _forced_family = previous


@contextlib.contextmanager
def tile_choices(choices: dict):
    """Launch with choices[(kernel, kind)] ({BLOCK_*, num_warps, num_stages: value}) over the table's entry of
    that kernel and dot kind, in place of the tuned table's tiles: bench.tune tries tiles on a GPU this way.
    Launch plans follow (the choices are part of policy_state)."""
    global _tile_choices
    frozen = tuple(sorted((kernel, kind, tuple(sorted(tiles.items()))) for (kernel, kind), tiles in choices.items()))
    previous, _tile_choices = _tile_choices, frozen
    try:
        yield
    finally:
        _tile_choices = previous


def configs_given() -> set:
    """(kernel, dot kind) of every launch configuration given out in this process: which table entries a
    workload uses (bench.tune sweeps their tiles)."""
    return set(_configs_given)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launchers (triton.cdiv is a constexpr function, costly to call from Python)."""
    return -(-a // b)


def policy_state(device: torch.device) -> tuple:
    """What a launch's policy depends on besides its own arguments: the memo key of family, fill_target and
    launch_config, and of launchers' plans memoized per call signature (KERNELS_INTERPRETED is fixed for the
    process)."""
    return device, _forced_family, _gpu_tiles_in_interpreter, _tile_choices


@functools.lru_cache(maxsize=None)
def _family(state: tuple) -> str:
    device, forced, _, _ = state
    if forced is not None:
        return forced
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return "sm90"
    return "sm80"


def family(device: torch.device) -> str:
    return _family(policy_state(device))


@functools.lru_cache(maxsize=None)
def _fill_target(state: tuple) -> int:
    device, forced, gpu_tiles, _ = state
    if forced is not None:
        return FAMILY_SMS[forced]
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1 if KERNELS_INTERPRETED and not gpu_tiles else FAMILY_SMS[_family(state)]


def fill_target(device: torch.device) -> int:
    """Programs a launch needs so that every SM of the GPU gets one: small launches (batch 1) split work
    until they reach it (more output tiles, or a split reduction summed in a fixed order). 1 on CPU, except
    under the interpreter's GPU tiles, so that tests run the split paths a GPU takes."""
    return _fill_target(policy_state(device))


def halve_to_fill(tiles: dict, name: str, programs, target: int, smallest: int = 16) -> dict:
    """Halve tiles[name], down to `smallest`, until programs(tiles) reaches `target` (fill_target)."""
    while programs(tiles) < target and tiles[name] > smallest:
        tiles[name] //= 2
    return tiles


def dot_kind(compute_dtype: torch.dtype, precision: str = "tf32") -> str:
    return precision if compute_dtype == torch.float32 else "16-bit"


def launch_config(kernel: str, device: torch.device, compute_dtype: torch.dtype = torch.float32,
                  precision: str = "tf32", **extents) -> dict:
    """The launch of `kernel` on `device` with operands computed in `compute_dtype`: a copy of the table's
    entry, each BLOCK_<NAME> given an extent fitted to it (a power of 2 covering it, at least smallest_block,
    at most the table's cap, 4x that under the interpreter's tiles), the interpreter's row tile under the
    interpreter, and the fp-fusion choice. Memoized: launchers call it on every launch."""
    state = policy_state(device)
    return dict(_launch_config(kernel, state, dot_kind(compute_dtype, precision), tuple(sorted(extents.items()))))


def table_entry(kernel: str, kind: str, family_name: str) -> dict:
    """The launch-config table's entry for a kernel, dot kind and GPU family ("*" entries match any)."""
    entries = _CONFIGS[kernel]
    key = next((key for key in ((kind, family_name), (kind, "*"), ("*", family_name), ("*", "*")) if key in entries),
               None)
    if key is None:
        raise KeyError(f"no launch configuration for {kernel} ({kind}, {family_name})")
    return entries[key]


def smallest_block(kernel: str, name: str) -> int:
    """The least a BLOCK_* of `kernel` may be: 16, tl.dot's least K (and M, N), or 4 for a conv's channel block,
    whose 4 taps make one dot's K."""
    return 4 if (kernel, name) in _TAP_BLOCKS else 16


def tunable(config: dict) -> dict:
    """What bench.tune climbs of a launch config: its tiles (BLOCK_*), warps and stages."""
    return {k: v for k, v in config.items() if k.startswith("BLOCK_") or k in ("num_warps", "num_stages")}


@functools.lru_cache(maxsize=4096)
def _launch_config(kernel: str, state: tuple, kind: str, extents: tuple) -> dict:
    entry = table_entry(kernel, kind, _family(state))
    config = dict(entry, enable_fp_fusion=FP_FUSION)
    tiles, measured_over = _chosen_tiles(state).get((kernel, kind), ({}, None))
    if measured_over is None or measured_over == tunable(entry):
        config.update(tiles)  # a tuned choice holds while the table's entry is the one it was measured against
    _configs_given.add((kernel, kind))
    _, _, gpu_tiles, _ = state
    interpreter_sized = KERNELS_INTERPRETED and not gpu_tiles
    if interpreter_sized and kernel in _INTERPRETER_ROWS:
        rows, size = _INTERPRETER_ROWS[kernel]
        config[rows] = size
    for name, extent in extents:
        cap = config[name] * 4 if interpreter_sized else config[name]
        config[name] = min(cap, max(smallest_block(kernel, name), 1 << (extent - 1).bit_length()))
    return config


LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")  # compile options, not kernel arguments


def json_constexprs(meta: dict) -> dict:
    """A launch's constexprs as JSON values (a tl.dtype by its name), launch options left out."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in meta.items()
            if k not in LAUNCH_OPTIONS}


def tuned_key(device: str, triton_version: str, kernel_name: str, dtype: str, constexprs: dict) -> tuple:
    """How bench.tune files a launch and how launchers look it up: one key for both sides."""
    return device, triton_version, kernel_name, dtype, json.dumps(json_constexprs(constexprs), sort_keys=True)


@functools.cache
def _tuned_table() -> dict:
    return json.loads(TUNED_TABLE.read_text()) if TUNED_TABLE.exists() else {}


@functools.cache
def _tuned() -> dict:
    """bench.tune's per-launch winners: tuned_key -> (num_warps, num_stages)."""
    return {tuned_key(e["device"], e["triton"], e["kernel"], e["dtype"], e["constexprs"]):
            dict(num_warps=e["num_warps"], num_stages=e["num_stages"]) for e in _tuned_table().get("entries", [])}


@functools.cache
def _tuned_tiles(device_name: str) -> dict:
    """bench.tune's tile winners for this GPU and triton: {(kernel, dot kind): (tiles, the launch config's
    entry they were measured against)}."""
    import triton

    mine = (device_name, triton.__version__)
    return {(e["kernel"], e["kind"]): (e["tiles"], e.get("table_tiles", {}))
            for e in _tuned_table().get("tiles", []) if (e["device"], e["triton"]) == mine}


def _chosen_tiles(state: tuple) -> dict:
    """{(kernel, dot kind): (tiles, the table's entry they replace, None for any)} over the table:
    tile_choices' while active (over any entry), else bench.tune's winners for the GPU (none on other
    devices), each only while the table still has the entry it was measured against (an edited table entry
    drops its tuned tiles)."""
    device, _, _, choices = state
    if choices is not None:
        return {(kernel, kind): (dict(tiles), None) for kernel, kind, tiles in choices}
    return _tuned_tiles(torch.cuda.get_device_name(device)) if device.type == "cuda" else {}


def tuned_options(kernel_name: str, args: tuple, meta: dict) -> dict:
    """num_warps/num_stages that bench.tune measured fastest for this launch on this GPU, else {} (at once
    when there is no table, so launches pay nothing for it)."""
    tuned = _tuned()
    if not tuned or _tile_choices is not None:  # bench.tune's tile sweep times the options it chose
        return {}
    first = next(a for a in args if isinstance(a, torch.Tensor))
    if first.device.type != "cuda":
        return {}
    return _tuned_lookup(first.device, kernel_name, first.dtype, tuple(meta.items()))


@functools.lru_cache(maxsize=4096)
def _tuned_lookup(device: torch.device, kernel_name: str, dtype: torch.dtype, meta: tuple) -> dict:
    """tuned_options' table lookup, memoized per launch signature: the key (device name, constexprs as JSON)
    costs more host time than a launch's other work. Shared: callers must not modify the result."""
    import triton

    key = tuned_key(torch.cuda.get_device_name(device), triton.__version__, kernel_name,
                    str(dtype).removeprefix("torch."), dict(meta))
    return _tuned().get(key, {})


@dataclass
class Launch:
    """One kernel launch as `launch` makes it: the @triton.jit kernel, its grid, its positional arguments
    and its constexprs and compile options (meta)."""
    kernel: object
    grid: tuple
    args: tuple
    meta: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


_observers = []  # (callback or None, run) of each active observe_launches
_stubbing = []  # one entry per active observe_launches(run=False)


@contextlib.contextmanager
def observe_launches(callback=None, *, run: bool = True):
    """Call callback(Launch) for every kernel launch while active (None: no call); with run=False the
    kernels are not run (to count, list or compile launches, or to time the host side of a forward). Nests."""
    entry = (callback, run)
    _observers.append(entry)
    if not run:
        _stubbing.append(entry)
    try:
        yield
    finally:
        _observers.remove(entry)
        if not run:
            _stubbing.remove(entry)


def launches_stubbed() -> bool:
    """Whether an observer stops launches (then the triton backend may take CPU tensors: nothing runs)."""
    return bool(_stubbing)


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta): every launch of the package goes through here. Takes the num_warps/
    num_stages that bench.tune measured fastest for this launch on this GPU where it measured them, and
    always passes the fp-fusion choice."""
    meta = {"enable_fp_fusion": FP_FUSION} | meta | tuned_options(kernel.fn.__name__, args, meta)
    if _observers:
        for callback, _ in _observers:
            if callback is not None:
                callback(Launch(kernel, tuple(grid), args, meta))
        if _stubbing:
            return
    kernel[grid](*args, **meta)


def kernels_fingerprint() -> str:
    """sha256 (16 hex digits) of this package's sources: which kernels a GPU measurement was of."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def _auto_table() -> dict:
    """AUTO_TABLE's choices: the latest GPU evidence per family. Measured on other kernels than these (its
    fingerprint differs), it still holds where ours was measured slower: an op is not run on our kernels
    by default until a GPU run of them shows it is no longer slower."""
    if not AUTO_TABLE.exists():
        return {}
    table = json.loads(AUTO_TABLE.read_text())
    return {(e["family"], e["op"], e["mode"], e["dtype"]): e["backend"] for e in table["entries"]}


def auto_choice(family_name: str, op: str, mode: str, dtype: str) -> str:
    """"triton" (ours) unless the latest GPU run on this family measured the cuDNN composition ("torch")
    faster for this op, mode ("inference" or "training") and dtype."""
    return _auto_table().get((family_name, op, mode, dtype), "triton")


def auto_backend(op: str, x: torch.Tensor, training: bool) -> str:
    """backend="auto" for op on x: auto_choice on CUDA, "torch" elsewhere."""
    if not x.is_cuda:
        return "torch"
    return auto_choice(family(x.device), op, "training" if training else "inference",
                       str(x.dtype).removeprefix("torch."))
