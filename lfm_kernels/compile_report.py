"""Compile every Triton kernel of lfm_kernels for real GPUs, without a GPU.

    python -m lfm_kernels.compile_report OUT_DIR [--targets 80,90]

Each op's launchers run on small CPU tensors at the model's shapes while kernel launches are
intercepted; every recorded launch (kernel, argument types, constexprs) is compiled with
triton.compile for each target. One row per kernel variant and target: registers, spill bytes
(from ptxas -v), shared memory, and whether the SASS holds tensor-core instructions (HMMA,
HGMMA). Cubins go to OUT_DIR. Exits 1 on a compile error, a spill, or a kernel of the package
that no workload launched. Must run without TRITON_INTERPRET (kernels must be real JIT functions).
"""
import argparse
import contextlib
import importlib
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas  # the ptxas triton itself uses for that target
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import lfm_kernels
from lfm_kernels.backend import MAX_KERNEL_K, PRECISIONS

_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_PTR_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32",
              torch.int64: "*i64", torch.uint8: "*u8", torch.bool: "*i1"}
_MMA = re.compile(r"\b(HMMA|HGMMA|IMMA|WGMMA)\b")


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    variant: str


@contextlib.contextmanager
def record_launches(store: dict, variant: str):
    """Replace kernel launches with a record of their arguments (one per distinct specialization)."""
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        types = tuple(_arg_type(a) for a in args) + tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        store.setdefault((self.fn.__name__, types), Launch(self, args, kwargs, variant))

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
    """Forward and backward of every op at LFM's shapes (B=2, 256x256 input, 30x30 score map), in both
    float32 precisions, and Top-K at the largest supported k on a 256x256 map. Launches are
    intercepted, so the tensors' contents never matter."""
    ops = torch.ops.lfm
    seed = torch.tensor([1, 2])
    image = torch.randn(2, 3, 256, 256, dtype=dtype)
    ops.npr_residual(image, 2, True)
    ops.npr_residual_backward(image, image, 2, True)
    scores = torch.randn(2, 64, 30, 30, dtype=dtype)
    for apply_drop in (False, True):
        ops.topk_pool(scores, 16, seed, 0.1, 0.3, apply_drop)
    ops.random_k_pool(scores, 16, seed)
    wide = torch.randn(1, 2, 256, 256, dtype=dtype)
    ops.topk_pool(wide, MAX_KERNEL_K, seed, 0.1, 0.3, True)
    ops.random_k_pool(wide, MAX_KERNEL_K, seed)
    idx = torch.zeros(2, 64, 16, dtype=torch.int64)
    keep = torch.ones(2, 64, 16, dtype=torch.uint8)
    ops.scatter_rows(torch.randn(2, 64, 16, dtype=dtype), idx, keep, 1.25, [2, 64, 30, 30])
    feat = torch.randn(2, 512, 30, 30, dtype=dtype)
    weight = torch.randn(64, 512, 1, 1, dtype=dtype)
    block3 = torch.randn(2, 256, 31, 31, dtype=dtype)
    vec = torch.ones(512)
    for precision in PRECISIONS if dtype == torch.float32 else ("tf32",):
        ops.score_topk(feat, weight, 16, seed, 0.1, 0.3, True, precision)
        ops.score_topk_backward(torch.randn(2, 64, 16, dtype=dtype), feat, weight, idx, keep, 1.25, precision)
        # SNet at 256x256: stem (NPR, 3 -> 64), a middle block (128 -> 256), the head (256 -> 512 -> 64).
        for x, cout, npr in ((image, 64, True), (torch.randn(2, 128, 63, 63, dtype=dtype), 256, False)):
            w = torch.randn(cout, x.shape[1], 2, 2)
            v = vec[:cout]
            ops.snet_block_eval(x, w, v, v, v, v, v, 1e-5, True, npr, precision, dtype)
            out, argmax, mean, var = ops.snet_block_train(x, w, v, v, v, v, v, 1e-5, True, True, npr, precision, dtype)
            grad = torch.randn(out.shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
            ops.snet_block_backward(grad, x, w, v, v, v, v, v, argmax, 1e-5, True, True, npr, precision, dtype, True)
        ops.snet_head_eval(block3, torch.randn(512, 256, 2, 2), vec, vec, vec, vec, vec, 1e-5, weight, 16, precision,
                           dtype)


def package_kernels():
    """Every @triton.jit kernel (name ending in _kernel) defined in lfm_kernels' modules."""
    found = {}
    for info in pkgutil.iter_modules(lfm_kernels.__path__):
        module = importlib.import_module(f"lfm_kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == module.__name__:
                found[name] = obj
    return found


def collect_launches():
    store = {}
    for dtype, variant in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        with record_launches(store, variant), torch.no_grad():
            _workloads(dtype)
    return list(store.values())


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


def _resources(ptx: str, cc: int):
    """(registers, spill bytes) from ptxas -v on the PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
        out = subprocess.run([get_ptxas(cc).path, "-v", f"-arch={arch}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills


def _sass_mma(cubin_path: Path) -> bool:
    sass = subprocess.run([str(_TOOLS / "cuobjdump"), "--dump-sass", str(cubin_path)],
                          capture_output=True, text=True, check=True).stdout
    return bool(_MMA.search(sass))


_JOBS = []


def _report_row(i: int):
    """Compile job i of _JOBS; returns (table row, ok). Runs in a worker process."""
    launch, tag, cc, out_dir = _JOBS[i]
    name = launch.kernel.fn.__name__
    try:
        compiled = compile_launch(launch, cc)
    except Exception as err:  # report every kernel, then fail
        return f"{name:34s} {tag:8s} sm_{cc}  COMPILE ERROR: {str(err).splitlines()[0][:200]}", False
    cubin = out_dir / f"{name}-{tag}-sm_{cc}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    regs, spills = _resources(compiled.asm["ptx"], cc)
    mma = "yes" if _sass_mma(cubin) else "no"
    return f"{name:34s} {tag:8s} sm_{cc}  {regs:4d} {spills:5d} {compiled.metadata.shared:7d} {mma:>3s}", spills == 0


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

    launches = collect_launches()
    failed = False
    missing = sorted(set(package_kernels()) - {launch.kernel.fn.__name__ for launch in launches})
    for name in missing:
        print(f"ERROR: kernel {name} is launched by no workload of the compile report", file=sys.stderr)
        failed = True

    jobs = []
    seen = {}
    for launch in sorted(launches, key=lambda l: l.kernel.fn.__name__):
        name = launch.kernel.fn.__name__
        seen[name, launch.variant] = seen.get((name, launch.variant), 0) + 1
        jobs += [(launch, f"{launch.variant}.{seen[name, launch.variant]}", cc, args.out_dir) for cc in targets]
    global _JOBS
    _JOBS = jobs  # inherited by the forked workers (kernels don't pickle)
    with multiprocessing.get_context("fork").Pool(max(1, min(args.jobs, len(jobs)))) as pool:
        rows = pool.map(_report_row, range(len(jobs)))
    header = f"{'kernel':34s} {'variant':8s} {'target':6s} {'regs':>4s} {'spill':>5s} {'shared':>7s} {'mma':>3s}"
    print(header)
    print("-" * len(header))
    for line, ok in rows:
        print(line)
        failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
