"""Compile every Triton launch of LFM for real GPUs, without a GPU: the design check of the kernels' structure.

    python -m bench.compile_report OUT_DIR [--targets 80,90] [--jobs N]

Launches are found by running LFM itself (bench.workloads: inference at batch 1, 8, 32 and 256, both kinds
of training step with their backward, and the standalone ops) on CPU tensors with every launch stubbed out
(lfm_kernels.configs.observe_launches with run=False), as a GPU of each target's family makes them
(configs.gpu_family, configs.gpu_tile_sizes): float32 with TF32 and with full-float32 ("ieee") dots, and
bfloat16. Each distinct launch (kernel, argument types, constexprs, compile options: num_warps, num_stages,
enable_fp_fusion) is compiled with triton.compile for each target. One row per launch and target, read from
the cubin (cuobjdump): registers, stack and local memory per thread, local-memory instructions in the SASS
(STL/LDL: spills), shared memory, the tensor-core instruction kind (HGMMA, HMMA or none), the widest wgmma
shape (HGMMA.MxNxK), the wgmma groups kept in flight (the most a WARPGROUP.DEPBAR wait lets pend), the
loads that feed the pipeline (TMA: UTMALDG, cp.async: LDGSTS, else sync), the pipeline stages, and the CTAs
and warps that fit on one SM (H100/H200 for sm_90, A100 for sm_80). Then every launch of LFM's float32
inference at 256x256 at each batch: its programs, the SMs they fill and its waves.

Structure that a fast sm_90 GEMM needs is reported in the notes column, not failed: wgmma N < 64, no wgmma
group in flight ("wgmma sync": each waited for before the next is issued, so the tensor cores idle between
them; Triton does this to a dot whose result another dot of the same loop step reads, and ptxas to a
pipeline it cannot keep, its C7515 advisory), fewer than 3 stages, loads not in flight (sync), spills (a few
spills in a pipelined 128x128 kernel cost less than idle tensor cores: choose by measured speed). Exits 1 on
a compile error, a kernel of lfm_kernels that no workload launched, an sm_90 launch with TF32 or 16-bit dots
and no HGMMA, or an inference launch at batch 1 or 8 with fewer programs than SMs; exits 2 on bad
arguments. Cubins and OUT_DIR/report.json go to OUT_DIR (absent, empty, or holding an earlier report). Needs
TRITON_INTERPRET unset (the kernels must be real JIT functions).
"""
import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PROG = "python -m bench.compile_report"
REPORT_TAG = "bench.compile_report"
EVAL_BATCHES = (1, 8, 32, 256)
FILL_BATCHES = (1, 8)  # every inference launch must give every SM a program at these batches
# (variant tag, dtype, float32 dot precision): what each target is compiled for.
VARIANTS = (("fp32-tf32", torch.float32, "tf32"), ("fp32-ieee", torch.float32, "ieee"), ("bf16", torch.bfloat16, None))
_PTR_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32",
              torch.int64: "*i64", torch.uint8: "*u8", torch.bool: "*i1"}
_MMA = re.compile(r"\b(HGMMA|HMMA)\b")
_WGMMA_SHAPE = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)")
_WGMMA_WAIT = re.compile(r"\bWARPGROUP\.DEPBAR\.LE\s+gsb0\s*,\s*(0x[0-9a-fA-F]+|\d+)")
_LOCAL_MEMORY = re.compile(r"\b(STL|LDL)\b")
_TMA_LOAD = re.compile(r"\bUTMALDG\b")
_ASYNC_COPY = re.compile(r"\bLDGSTS\b")
# Per SM: (registers, shared memory bytes, warps, CTAs); H100/H200 for sm_90, A100 for sm_80.
_SM_LIMITS = {90: (65536, 228 * 1024, 64, 32), 80: (65536, 164 * 1024, 64, 32)}
MIN_WGMMA_N, MIN_STAGES = 64, 3  # the structure of a GEMM that keeps sm_90's tensor cores busy


def _family(cc: int) -> str:
    return "sm90" if cc >= 90 else "sm80"


def _tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass
class Recorded:
    """A distinct launch of a workload variant: configs.Launch plus the variant it came from."""
    launch: object  # lfm_kernels.configs.Launch
    variant: str

    @property
    def name(self) -> str:
        return self.launch.name


def arg_type(arg) -> str:
    """Triton's signature type of a kernel argument."""
    if isinstance(arg, torch.Tensor):
        return _PTR_TYPES[arg.dtype]
    if isinstance(arg, bool):
        return "i1"
    if isinstance(arg, int):
        return "i32" if -(2**31) <= arg < 2**31 else "i64"
    if isinstance(arg, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {arg!r}")


def arg_specialization(arg) -> tuple:
    """(type, specialization) of a kernel argument as the JIT compiles it at a real launch: an integer equal
    to 1 becomes the constant 1 ("1"), one divisible by 16 is compiled as such ("D": what lets NHWC channel
    loads vectorize and go asynchronous), pointers are 16-byte aligned ("D": torch allocations are)."""
    if isinstance(arg, int) and not isinstance(arg, bool):
        if arg == 1:
            return "constexpr", "1"
        return arg_type(arg), "D" if arg % 16 == 0 else ""
    return arg_type(arg), "D" if isinstance(arg, torch.Tensor) else ""


def launch_key(launch) -> tuple:
    """What makes two launches one compiled kernel: name, argument types and specializations, constexprs and
    options."""
    return (launch.name, tuple(arg_specialization(a) for a in launch.args),
            tuple(sorted((k, repr(v)) for k, v in launch.meta.items())))


@contextlib.contextmanager
def launches_as(family: str):
    """Stub out every launch and make them as a GPU of `family` would, on CPU tensors: the launchers take
    the GPU's tiles and fill targets (the kernels being real JIT functions, not interpreted, they also get
    tl.dot's operands as a GPU does)."""
    from bench.workloads import cpu_tensors_take_the_triton_path
    from lfm_kernels import configs

    with contextlib.ExitStack() as stack:
        stack.enter_context(cpu_tensors_take_the_triton_path())
        stack.enter_context(configs.gpu_family(family))
        stack.enter_context(configs.gpu_tile_sizes())
        yield stack


def record_launches(family: str) -> list:
    """Every distinct launch of bench.workloads in each of VARIANTS, as a GPU of `family` makes them."""
    from bench.workloads import lfm_workloads
    from lfm_kernels import configs

    store = {}
    for variant, dtype, precision in VARIANTS:
        def record(launch, variant=variant):
            store.setdefault(launch_key(launch), Recorded(launch, variant))

        with launches_as(family), configs.observe_launches(record, run=False):
            lfm_workloads(dtype, "cpu", precision, eval_batches=EVAL_BATCHES)
    return list(store.values())


def eval_launches(family: str) -> list:
    """[(batch, stage, launch)] of every launch of LFM's float32 (TF32) inference at 256x256, at each of
    EVAL_BATCHES, as a GPU of `family` makes them; stage is the SNet block running ("block 1" to "block 3")
    or "head" (everything after block 3)."""
    from bench.workloads import inference, lfm_model
    from lfm_kernels import configs

    model = lfm_model(torch.float32, "cpu", "tf32")
    stage, launches = [""], []
    for i in (1, 2, 3):
        layer = getattr(model.cnn, f"layer{i}")
        layer.register_forward_pre_hook(lambda module, args, i=i: stage.__setitem__(0, f"block {i}"))
    model.cnn.layer3.register_forward_hook(lambda module, args, out: stage.__setitem__(0, "head"))
    for batch in EVAL_BATCHES:
        with launches_as(family), configs.observe_launches(lambda launch: launches.append((batch, stage[0], launch)),
                                                            run=False):
            inference(model, batch)
    return launches


def package_kernels() -> dict:
    """Every @triton.jit kernel (name ending in _kernel) defined in lfm_kernels' modules."""
    from triton.runtime.jit import JITFunction

    import lfm_kernels

    found = {}
    for info in pkgutil.iter_modules(lfm_kernels.__path__):
        module = importlib.import_module(f"lfm_kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == module.__name__:
                found[name] = obj
    return found


def compile_launch(launch, cc: int):
    """triton.compile of one recorded launch for compute capability cc, with the launch's own compile
    options (configs.LAUNCH_OPTIONS: num_warps, num_stages, enable_fp_fusion)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lfm_kernels.configs import LAUNCH_OPTIONS

    fn = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    positional = iter(launch.args)
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            if name not in launch.meta:
                raise TypeError(f"constexpr {name} of {launch.name} is not passed by keyword")
            signature[name], constexprs[name] = "constexpr", launch.meta[name]
            continue
        kind, specialization = arg_specialization(next(positional))
        signature[name] = kind
        if specialization == "1":
            constexprs[name] = 1
        elif specialization == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: launch.meta[k] for k in LAUNCH_OPTIONS if k in launch.meta}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                          options=options)


def cubin_resources(usage: str) -> dict:
    """Registers, stack and local bytes per thread from `cuobjdump --dump-resource-usage`."""
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}


def sass_facts(sass: str) -> dict:
    """From the SASS: local-memory instructions (STL/LDL: spills or stack traffic), the tensor-core
    instruction kind, the widest wgmma shape (MxNxK, "-" without HGMMA), how many wgmma groups stay in
    flight (the most any WARPGROUP.DEPBAR wait lets pend: 0 when every group is waited for before the next is
    issued, whether Triton made the dot synchronous or ptxas serialized it; "-" without HGMMA) and how loads
    are issued: "TMA" (UTMALDG), "cp.async" (LDGSTS: asynchronous copies that a pipeline keeps in flight) or
    "sync"."""
    kinds = set(_MMA.findall(sass))
    shapes = {tuple(map(int, m)) for m in _WGMMA_SHAPE.findall(sass)}
    widest = max(shapes, key=lambda s: (s[1], s[0], s[2])) if shapes else None
    waits = [int(n, 0) for n in _WGMMA_WAIT.findall(sass)]
    return {"local_ops": len(_LOCAL_MEMORY.findall(sass)),
            "mma": "HGMMA" if "HGMMA" in kinds else "HMMA" if kinds else "none",
            "wgmma": "x".join(map(str, widest)) if widest else "-",
            "in_flight": max(waits, default=0) if widest else "-",
            "loads": "TMA" if _TMA_LOAD.search(sass) else "cp.async" if _ASYNC_COPY.search(sass) else "sync"}


def occupancy(regs: int, shared: int, num_warps: int, cc: int) -> tuple[int, int]:
    """(CTAs, active warps) per SM: registers are allocated per warp in units of 256, shared memory per CTA."""
    max_regs, max_shared, max_warps, max_ctas = _SM_LIMITS[80 if cc < 90 else 90]
    regs_per_warp = -(-regs * 32 // 256) * 256
    ctas = min(max_ctas, max_warps // num_warps, max_regs // max(1, regs_per_warp * num_warps),
               max_shared // shared if shared else max_ctas)
    return ctas, ctas * num_warps


def dot_kind(meta: dict) -> str:
    """The dots a launch runs: "-" (none: no dot constexprs), "16-bit", "tf32" or "ieee" (full float32)."""
    if "PRECISION" not in meta:
        return "-"
    # DOT_DTYPE: what tl.dot gets (on a GPU the operands' dtype; older kernels also name OPERAND_DTYPE).
    return "16-bit" if str(meta.get("DOT_DTYPE", meta.get("OPERAND_DTYPE"))) in ("fp16", "bf16") else meta["PRECISION"]


def on_tensor_cores(row: dict) -> bool:
    return row["dot"] in ("tf32", "16-bit")


def structure_notes(row: dict) -> list:
    """What an sm_90 GEMM launch lacks of the structure that keeps tensor cores busy, and its spills."""
    notes = []
    if "error" in row:
        return notes
    if row["target"] == "sm_90" and on_tensor_cores(row):
        if row["mma"] != "HGMMA":
            notes.append("no HGMMA")
        else:
            if int(row["wgmma"].split("x")[1]) < MIN_WGMMA_N:
                notes.append(f"N<{MIN_WGMMA_N}")
            if row["in_flight"] == 0:
                notes.append("wgmma sync")
        if row["stages"] < MIN_STAGES:
            notes.append(f"stages<{MIN_STAGES}")
        if row["loads"] == "sync":
            notes.append("sync loads")
    if row["stack"] or row["local"] or row["local_ops"]:
        notes.append("spills")
    return notes


def row_failure(row: dict):
    """Why a compiled row fails the report (None when it passes): a compile error, or TF32 or 16-bit dots
    without wgmma on sm_90 (every GEMM of the package has it: the convs and the 1x1 scoring and its backward)."""
    if "error" in row:
        return f"compile error: {row['error']}"
    if row["target"] == "sm_90" and on_tensor_cores(row) and row["mma"] != "HGMMA":
        return f"{row['dot']} dots without HGMMA on sm_90"
    return None


_JOBS = []


def report_row(job) -> dict:
    """Compile one (Recorded, target cc, out_dir, tag) job and read its cubin; error set on a compile failure."""
    recorded, cc, out_dir, tag = job
    launch = recorded.launch
    row = {"kernel": launch.name, "variant": tag, "target": f"sm_{cc}", "dot": dot_kind(launch.meta),
           "stages": launch.meta.get("num_stages", 0), "fp_fusion": launch.meta.get("enable_fp_fusion")}
    try:
        compiled = compile_launch(launch, cc)
    except Exception as err:  # noqa: BLE001 (report every kernel, then fail)
        return row | {"error": str(err).splitlines()[0][:200] if str(err) else type(err).__name__}
    cubin = out_dir / f"{launch.name}-{tag}-sm_{cc}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tools = _tools()
    usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    sass = subprocess.run([str(tools / "cuobjdump"), "--dump-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    row |= cubin_resources(usage) | sass_facts(sass)
    row |= {"shared": compiled.metadata.shared, "warps": compiled.metadata.num_warps}
    row["ctas_per_sm"], row["warps_per_sm"] = occupancy(row["regs"], row["shared"], row["warps"], cc)
    row["notes"] = ",".join(structure_notes(row)) or "-"
    return row


def _report_job(i: int) -> dict:
    return report_row(_JOBS[i])  # in a forked worker: the jobs are inherited (kernels don't pickle)


def compile_rows(jobs: list, processes: int) -> list:
    global _JOBS
    _JOBS = jobs
    if processes <= 1 or len(jobs) <= 1:
        return [report_row(job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(min(processes, len(jobs))) as pool:
        return pool.map(_report_job, range(len(jobs)))


def eval_waves(rows: list, keys: dict, targets: list) -> list:
    """Every launch of LFM's inference at EVAL_BATCHES: its programs, the SMs they fill (programs / SMs) and
    its waves (programs / (SMs x CTAs per SM), CTAs per SM of that very launch's compiled row)."""
    from lfm_kernels.configs import FAMILY_SMS

    by_key = {(row["target"], keys[i]): row for i, row in enumerate(rows)}
    waves = []
    for cc in targets:
        sms = FAMILY_SMS[_family(cc)]
        for batch, stage, launch in eval_launches(_family(cc)):
            row = by_key.get((f"sm_{cc}", launch_key(launch)), {})
            ctas = row.get("ctas_per_sm", 1)
            waves.append({"target": f"sm_{cc}", "batch": batch, "stage": stage, "kernel": launch.name,
                          "programs": launch.programs, "sms_filled": launch.programs / sms,
                          "waves": launch.programs / (sms * ctas)})
    return waves


COLUMNS = (("kernel", 28), ("variant", 13), ("target", 6), ("dot", 6), ("regs", 4), ("stack", 5), ("local", 5),
           ("local_ops", 9), ("shared", 6), ("mma", 5), ("wgmma", 9), ("in_flight", 9),
           ("loads", 8), ("stages", 6), ("warps", 5),
           ("ctas_per_sm", 11), ("notes", 0))
_LEFT = {"kernel", "variant", "target", "dot", "mma", "wgmma", "loads", "notes"}


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['kernel']:28s} {row['variant']:13s} {row['target']:6s} COMPILE ERROR: {row['error']}"
    return " ".join(f"{row[name]:<{width}}" if name in _LEFT else f"{row[name]:>{width}}" for name, width in COLUMNS)


def format_header() -> str:
    return " ".join(f"{name:<{width}}" if name in _LEFT else f"{name:>{width}}" for name, width in COLUMNS)


class UsageError(Exception):
    pass


def check_out_dir(out_dir: Path):
    """OUT_DIR must be absent, empty, or hold an earlier report of this tool (never write over other files)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"OUT_DIR {out_dir} is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        report = out_dir / "report.json"
        try:
            ours = json.loads(report.read_text()).get("tool") == REPORT_TAG
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UsageError(f"OUT_DIR {out_dir} holds files that are not an earlier compile report; give an empty "
                             "or new folder")


def parse_targets(text: str) -> list:
    try:
        targets = [int(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"--targets takes comma-separated compute capabilities such as 80,90, got {text!r}") from None
    unknown = [t for t in targets if t not in (80, 86, 89, 90)]
    if unknown or not targets:
        raise UsageError(f"--targets: compute capabilities must be among 80, 86, 89, 90, got {text!r}")
    return targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for the cubins and report.json")
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    try:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise UsageError("unset TRITON_INTERPRET (it replaces the kernels with the interpreter)")
        if args.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
        targets = parse_targets(args.targets)
        check_out_dir(args.out_dir)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)

    failures, jobs, keys = [], [], []
    kernels = set(package_kernels())
    for cc in targets:
        recorded = sorted(record_launches(_family(cc)), key=lambda r: (r.name, r.variant))
        for name in sorted(kernels - {r.name for r in recorded}):
            failures.append(f"kernel {name} is launched by no workload (sm_{cc})")
        seen = {}
        for r in recorded:
            seen[r.name, r.variant] = seen.get((r.name, r.variant), 0) + 1
            jobs.append((r, cc, args.out_dir, f"{r.variant}.{seen[r.name, r.variant]}"))
            keys.append(launch_key(r.launch))
    rows = compile_rows(jobs, args.jobs)
    print(format_header())
    for row in rows:
        print(format_row(row))
        failure = row_failure(row)
        if failure:
            failures.append(f"{row['kernel']} {row['variant']} {row['target']}: {failure}")
    waves = eval_waves(rows, keys, targets)
    print(f"\nLFM inference at 256x256, float32: every launch at each batch; SMs filled = programs / SMs (under 1 at "
          f"batch {' or '.join(map(str, FILL_BATCHES))} fails), waves = programs / (SMs x CTAs per SM)")
    print(f"{'target':6s} {'batch':>5s} {'stage':8s} {'kernel':28s} {'programs':>8s} {'SMs filled':>10s} {'waves':>6s}")
    for row in waves:
        print(f"{row['target']:6s} {row['batch']:>5d} {row['stage']:8s} {row['kernel']:28s} {row['programs']:>8d} "
              f"{row['sms_filled']:>10.2f} {row['waves']:>6.2f}")
        if row["batch"] in FILL_BATCHES and row["sms_filled"] < 1:
            failures.append(f"{row['kernel']} ({row['stage']}) leaves SMs idle at batch {row['batch']} on "
                            f"{row['target']}")
    (args.out_dir / "report.json").write_text(json.dumps(
        {"tool": REPORT_TAG, "package_kernels": sorted(kernels), "kernels": rows, "eval_waves": waves,
         "failures": failures}, indent=1))
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
