"""Compile every Triton kernel of lfm_kernels for real GPUs, without a GPU.

    python -m lfm_kernels.compile_report OUT_DIR [--targets 80,90]

Each op's launchers run on small CPU tensors at the model's shapes while kernel launches are
intercepted; every recorded launch (kernel, argument types, constexprs) is compiled with
triton.compile for each target. One row per kernel variant and target, read from the cubin Triton
built (cuobjdump): registers, stack and local memory per thread, local-memory instructions in the
SASS (STL/LDL: spills), shared memory, the tensor-core instruction kind (HGMMA, HMMA or none), and
the CTAs and warps that fit on one SM (H100/H200 for sm_90, A100 for sm_80). Cubins go to OUT_DIR,
the rows also to OUT_DIR/report.json. Then every launch of LFM's inference at 256x256 at batch
1, 8, 32 and 256: its programs, the SMs they fill (programs / SMs) and its waves (programs / (SMs x
CTAs per SM)). Exits 1 on a compile error, any stack, local memory or STL/LDL (a spill), a sm_90
TF32 or 16-bit conv kernel without HGMMA, a kernel of the package that no workload launched, or an
inference launch at batch 1 or 8 with fewer programs than SMs. Must run without TRITON_INTERPRET
(kernels must be real JIT functions).
"""
import argparse
import contextlib
import importlib
import json
import math
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import lfm_kernels
from lfm_kernels.checks import MAX_KERNEL_K
from lfm_kernels.configs import FAMILY_SMS, gpu_family
from lfm_kernels.precision import PRECISIONS

_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_PTR_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32",
              torch.int64: "*i64", torch.uint8: "*u8", torch.bool: "*i1"}
_MMA = re.compile(r"\b(HGMMA|HMMA)\b")
_LOCAL_MEMORY = re.compile(r"\b(STL|LDL)\b")
# Per SM: (registers, shared memory bytes, warps, CTAs); H100/H200 for sm_90, A100 for sm_80.
_SM_LIMITS = {90: (65536, 228 * 1024, 64, 32), 80: (65536, 164 * 1024, 64, 32)}


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    variant: str
    grid: tuple = ()


@contextlib.contextmanager
def record_launches(store: dict, variant: str):
    """Replace kernel launches with a record of their arguments (one per distinct specialization)."""
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        types = tuple(_arg_type(a) for a in args) + tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        store.setdefault((self.fn.__name__, types), Launch(self, args, kwargs, variant, tuple(grid)))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


def _arg_type(arg):
    if isinstance(arg, torch.Tensor):
        return _PTR_TYPES[arg.dtype]
    if isinstance(arg, bool):
        return "i1"
    if isinstance(arg, int):
        return "i32" if -(2**31) <= arg < 2**31 else "i64"
    if isinstance(arg, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {arg!r}")


def _workloads(dtype):
    """Forward and backward of every op at LFM's shapes (bench/shapes.py; batch 2), in both float32
    precisions, and Top-K at the largest supported k on a full-size map. Launches are intercepted, so
    the tensors' contents never matter."""
    from bench.shapes import FEATURE_CHANNELS, IMAGE_SIZE, SCORE_CHANNELS, SCORE_GRID, SNET_BLOCKS, K

    ops = torch.ops.lfm
    seed = torch.tensor([1, 2])
    image = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=dtype)
    ops.npr_residual(image, 2, True)
    ops.npr_residual_backward(image, image, 2, True)
    scores = torch.randn(2, SCORE_CHANNELS, *SCORE_GRID, dtype=dtype)
    for apply_drop in (False, True):
        ops.topk_pool(scores, K, seed, 0.1, 0.3, apply_drop)
    ops.random_k_pool(scores, K, seed)
    wide = torch.randn(1, 2, IMAGE_SIZE, IMAGE_SIZE, dtype=dtype)
    ops.topk_pool(wide, MAX_KERNEL_K, seed, 0.1, 0.3, True)
    ops.random_k_pool(wide, MAX_KERNEL_K, seed)
    idx = torch.zeros(2, SCORE_CHANNELS, K, dtype=torch.int64)
    keep = torch.ones(2, SCORE_CHANNELS, K, dtype=torch.uint8)
    ops.scatter_rows(torch.randn(2, SCORE_CHANNELS, K, dtype=dtype), idx, keep, 1.25, [2, SCORE_CHANNELS, *SCORE_GRID])
    feat = torch.randn(2, FEATURE_CHANNELS, *SCORE_GRID, dtype=dtype)
    score_weight = torch.randn(SCORE_CHANNELS, FEATURE_CHANNELS, 1, 1, dtype=dtype)
    head_in, head_out, head_side = SNET_BLOCKS[4]
    block3 = torch.randn(2, head_in, head_side, head_side, dtype=dtype)
    vec = torch.ones(head_out)
    for precision in PRECISIONS if dtype == torch.float32 else ("tf32",):
        ops.score_topk(feat, score_weight, K, seed, 0.1, 0.3, True, precision)
        ops.score_topk_backward(torch.randn(2, SCORE_CHANNELS, K, dtype=dtype), feat, score_weight, idx, keep, 1.25,
                                precision)
        for block in (1, 3):  # the stem (NPR, 3 input channels) and a middle block
            cin, cout, side = SNET_BLOCKS[block]
            x = torch.randn(2, cin, side, side, dtype=dtype)
            w, v, npr = torch.randn(cout, cin, 2, 2), vec[:cout], block == 1
            ops.snet_block_eval(x, w, v, v, v, v, v, 1e-5, True, npr, precision, dtype)
            out, argmax, mean, var = ops.snet_block_train(x, w, v, v, v, v, v, 1e-5, True, True, npr, precision, dtype)
            grad = torch.randn(out.shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
            ops.snet_block_backward(grad, x, w, v, v, v, v, v, argmax, 1e-5, True, True, npr, precision, dtype, True)
        ops.snet_head_eval(block3, torch.randn(head_out, head_in, 2, 2), vec, vec, vec, vec, vec, 1e-5, score_weight, K,
                           precision, dtype)
    for batch in FILL_BATCHES:  # the tiles small batches take to give every SM a program
        _eval_forward(batch, dtype)


def package_kernels():
    """Every @triton.jit kernel (name ending in _kernel) defined in lfm_kernels' modules."""
    found = {}
    for info in pkgutil.iter_modules(lfm_kernels.__path__):
        module = importlib.import_module(f"lfm_kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == module.__name__:
                found[name] = obj
    return found


def _eval_forward(batch: int, dtype, stage=lambda name: None):
    """LFM's inference kernels on a full-size image (stem, blocks 2 and 3, the head and its selection), as
    LFM calls them; stage(name) is called before each op."""
    from bench.shapes import IMAGE_SIZE, SCORE_CHANNELS, SNET_BLOCKS, K

    ops = torch.ops.lfm
    x = torch.empty(batch, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=dtype)
    for block in (1, 2, 3):
        cin, cout, _ = SNET_BLOCKS[block]
        v = torch.ones(cout)
        stage("stem" if block == 1 else f"block {block}")
        x = ops.snet_block_eval(x, torch.empty(cout, cin, 2, 2), v, v, v, v, v, 1e-5, True, block == 1, "tf32", dtype)
    cin, cout, _ = SNET_BLOCKS[4]
    v = torch.ones(cout)
    stage("head")
    ops.snet_head_eval(x, torch.empty(cout, cin, 2, 2), v, v, v, v, v, 1e-5, torch.empty(SCORE_CHANNELS, cout, 1, 1), K,
                       "tf32", dtype)


EVAL_BATCHES = (1, 8, 32, 256)
FILL_BATCHES = (1, 8)  # every inference launch must give every SM a program at these batches


def collect_launches(family: str):
    """Every distinct launch of the workloads, as a GPU of `family` makes them (configs.gpu_family)."""
    store = {}
    with gpu_family(family), torch.no_grad():
        for dtype, variant in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            with record_launches(store, variant):
                _workloads(dtype)
    return list(store.values())


def eval_grids(family: str) -> list:
    """[(batch, stage, kernel, programs)] of every launch of LFM's float32 inference at 256x256, at each of
    EVAL_BATCHES, as a GPU of `family` makes them."""
    launches, stage = [], [""]
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((batch, stage[0], self.fn.__name__, math.prod(grid)))

    JITFunction.run = record
    try:
        with gpu_family(family), torch.no_grad():
            for batch in EVAL_BATCHES:
                _eval_forward(batch, torch.float32, lambda name: stage.__setitem__(0, name))
    finally:
        JITFunction.run = original
    return launches


def compile_launch(launch: Launch, cc: int):
    fn = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    positional = iter(launch.args)
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = launch.kwargs[name]
            continue
        arg = next(positional)
        signature[name] = _arg_type(arg)
        if isinstance(arg, torch.Tensor):
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                          options=options)


def _cubin_resources(cubin_path: Path) -> dict:
    """Registers, stack and local bytes per thread, as cuobjdump reads them from the cubin."""
    usage = subprocess.run([str(_TOOLS / "cuobjdump"), "--dump-resource-usage", str(cubin_path)],
                           capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}


def _sass_facts(cubin_path: Path) -> dict:
    """Local-memory instructions (STL/LDL: spills or stack traffic) and the tensor-core instruction kind."""
    sass = subprocess.run([str(_TOOLS / "cuobjdump"), "--dump-sass", str(cubin_path)],
                          capture_output=True, text=True, check=True).stdout
    kinds = set(_MMA.findall(sass))
    return {"local_ops": len(_LOCAL_MEMORY.findall(sass)),
            "mma": "HGMMA" if "HGMMA" in kinds else "HMMA" if kinds else "none"}


def occupancy(regs: int, shared: int, num_warps: int, cc: int) -> tuple[int, int]:
    """(CTAs, active warps) per SM: registers are allocated per warp in units of 256, shared memory per CTA."""
    max_regs, max_shared, max_warps, max_ctas = _SM_LIMITS[80 if cc < 90 else 90]
    regs_per_warp = -(-regs * 32 // 256) * 256
    ctas = min(max_ctas, max_warps // num_warps, max_regs // max(1, regs_per_warp * num_warps),
               max_shared // shared if shared else max_ctas)
    return ctas, ctas * num_warps


_JOBS = []


def _report_row(i: int) -> dict:
    """Compile job i of _JOBS; returns its row (error set on a compile failure). Runs in a worker process."""
    launch, tag, cc, out_dir = _JOBS[i]
    precision = launch.kwargs.get("PRECISION", "-") if tag.startswith("fp32") else "-"  # 16-bit dots ignore it
    row = {"kernel": launch.kernel.fn.__name__, "variant": tag, "target": f"sm_{cc}", "precision": precision}
    try:
        compiled = compile_launch(launch, cc)
    except Exception as err:  # report every kernel, then fail
        return row | {"error": str(err).splitlines()[0][:200]}
    cubin = out_dir / f"{row['kernel']}-{tag}-sm_{cc}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    row |= _cubin_resources(cubin) | _sass_facts(cubin)
    row |= {"shared": compiled.metadata.shared, "warps": compiled.metadata.num_warps}
    row["ctas_per_sm"], row["warps_per_sm"] = occupancy(row["regs"], row["shared"], row["warps"], cc)
    return row


# Conv kernels that must run wgmma on sm_90 with tensor-core dots (TF32 or 16-bit).
HOPPER_MMA_KERNELS = {"_snet_block_fwd_kernel", "_snet_block_bwd_kernel", "_snet_head_kernel", "_conv2x2_dx_kernel",
                      "_conv2x2_dw_kernel"}


def row_ok(row: dict) -> bool:
    """Compiled, with nothing in local memory (no stack, no local bytes, no STL/LDL), and wgmma where
    HOPPER_MMA_KERNELS asks for it."""
    if "error" in row or row["stack"] or row["local"] or row["local_ops"]:
        return False
    hopper = row["kernel"] in HOPPER_MMA_KERNELS and row["target"] >= "sm_90" and row["precision"] != "ieee"
    return row["mma"] == "HGMMA" or not hopper


_COLUMNS = (("kernel", 34), ("variant", 8), ("target", 6), ("precision", 9), ("regs", 4), ("stack", 5), ("local", 5),
            ("local_ops", 9), ("shared", 7), ("mma", 5), ("warps", 5), ("ctas_per_sm", 11), ("warps_per_sm", 12))


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['kernel']:34s} {row['variant']:8s} {row['target']:6s} COMPILE ERROR: {row['error']}"
    return " ".join(f"{row[name]:<{width}}" if i < 4 else f"{row[name]:>{width}}"
                    for i, (name, width) in enumerate(_COLUMNS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_kernels.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for the cubins")
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_report: unset TRITON_INTERPRET (it replaces kernels with the interpreter)", file=sys.stderr)
        return 2
    targets = [int(t) for t in args.targets.split(",")]
    args.out_dir.mkdir(parents=True, exist_ok=True)

    failed = False
    jobs = []
    for cc in targets:
        launches = collect_launches("sm90" if cc >= 90 else "sm80")
        missing = sorted(set(package_kernels()) - {launch.kernel.fn.__name__ for launch in launches})
        for name in missing:
            print(f"ERROR: kernel {name} is launched by no workload of the compile report", file=sys.stderr)
            failed = True
        seen = {}
        for launch in sorted(launches, key=lambda recorded: recorded.kernel.fn.__name__):
            name = launch.kernel.fn.__name__
            seen[name, launch.variant] = seen.get((name, launch.variant), 0) + 1
            jobs.append((launch, f"{launch.variant}.{seen[name, launch.variant]}", cc, args.out_dir))
    global _JOBS
    _JOBS = jobs  # inherited by the forked workers (kernels don't pickle)
    with multiprocessing.get_context("fork").Pool(max(1, min(args.jobs, len(jobs)))) as pool:
        rows = pool.map(_report_row, range(len(jobs)))
    header = " ".join(f"{name:<{width}}" if i < 4 else f"{name:>{width}}" for i, (name, width) in enumerate(_COLUMNS))
    print(header)
    print("-" * len(header))
    for row in rows:
        print(format_row(row))
        failed |= not row_ok(row)
    waves = eval_waves(rows, targets)
    print("\nLFM inference at 256x256, float32: every launch at each batch; SMs filled = programs / SMs (under 1 at "
          f"batch {' or '.join(map(str, FILL_BATCHES))} fails), waves = programs / (SMs x CTAs per SM)")
    print(f"{'target':6s} {'batch':>5s} {'stage':8s} {'kernel':28s} {'programs':>8s} {'SMs filled':>10s} {'waves':>6s}")
    for row in waves:
        print(f"{row['target']:6s} {row['batch']:>5d} {row['stage']:8s} {row['kernel']:28s} {row['programs']:>8d} "
              f"{row['sms_filled']:>10.2f} {row['waves']:>6.2f}")
        if row["batch"] in FILL_BATCHES and row["sms_filled"] < 1:
            print(f"ERROR: {row['kernel']} ({row['stage']}) leaves SMs idle at batch {row['batch']} on {row['target']}",
                  file=sys.stderr)
            failed = True
    (args.out_dir / "report.json").write_text(json.dumps({"kernels": rows, "eval_waves": waves}, indent=1))
    return 1 if failed else 0


def eval_waves(rows: list, targets: list) -> list:
    """Every launch of LFM's inference at EVAL_BATCHES with the SMs it fills and its waves, from the CTAs
    per SM of its kernel's compiled float32 variants for that target (the fewest, where several)."""
    waves = []
    for cc in targets:
        family = "sm90" if cc >= 90 else "sm80"
        sms = FAMILY_SMS[family]
        for batch, stage, kernel, programs in eval_grids(family):
            compiled = [r for r in rows if r["kernel"] == kernel and r["target"] == f"sm_{cc}" and "error" not in r
                        and r["precision"] in ("tf32", "-") and r["variant"].startswith("fp32")]
            ctas = min(r["ctas_per_sm"] for r in compiled) if compiled else 1
            waves.append({"target": f"sm_{cc}", "batch": batch, "stage": stage, "kernel": kernel, "programs": programs,
                          "sms_filled": programs / sms, "waves": programs / (sms * ctas)})
    return waves


if __name__ == "__main__":
    sys.exit(main())
