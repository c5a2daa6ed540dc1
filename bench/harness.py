"""What every benchmark shares: the device and its case sizes, the one timing helper, the row schema.

Timing. pytest-benchmark runs the rounds and `device_clock` is its timer (bench/conftest.py installs
it): on a GPU the clock records a CUDA event and waits for it, so a round of `iterations` back-to-back
calls is timed on the device from an idle queue to the end of its last kernel. Launch overhead is in
the time whenever the host is the bottleneck, as it is in real use. Every call takes the next of a
rotation of input sets that together exceed twice the L2 cache, so no call reads what the previous
one left there. Warm-up calls (torch.compile, autotuning, cuDNN's algorithm search) come before the
timed rounds, and their wall time is in the row (warmup_s: about the compile time of a compile-*
provider). Rows report the median over rounds and its interquartile range (q1_s, q3_s).

Memory. On a GPU each row also carries peak_bytes (call_peak_bytes): what one more call allocates at its
peak beyond the memory already held.

Work. Each row carries the minimal work of what it computes, so that the report can turn a time
into GB/s and TFLOP/s and compare them with the GPU's measured peaks:
  bytes  every input and parameter read once and every output written once; with a backward, also
         each output gradient read once and each input or parameter gradient written once
         (intermediates stay on chip: the lower bound of a fully fused implementation);
  flops  the convolution and matmul FLOPs of the eager computation (torch.utils.flop_counter).
"""
import functools
import itertools
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import results, shapes
from bench.providers import CPU_PROVIDERS, GPU_PROVIDERS, LFM_BACKENDS, compiled, dtype_name

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DEFAULT_PROVIDERS = GPU_PROVIDERS if ON_GPU else CPU_PROVIDERS
DTYPES = (torch.float32, torch.bfloat16) if ON_GPU else (torch.float32,)
# Case sizes: LFM's (bench.shapes); on CPU smaller batches, so that make bench stays within a few minutes on 2 cores.
INFERENCE_BATCHES = shapes.INFERENCE_BATCHES if ON_GPU else (1,)
TRAIN_BATCH = shapes.TRAIN_BATCH if ON_GPU else 2
OP_BATCH = shapes.LARGE_BATCH if ON_GPU else 4  # per-op cases: the op's input at IMAGE_SIZE, this many images

FORWARD, FORWARD_BACKWARD = "forward", "forward+backward"
MODES = (FORWARD, FORWARD_BACKWARD)

ROUND_S = 2e-3 if ON_GPU else 20e-3  # shortest round: many short calls per round, so clock reads are noise
CASE_S = 0.3 if ON_GPU else 0.5  # timed seconds per case, within [MIN_ROUNDS, MAX_ROUNDS] rounds
MIN_ROUNDS, MAX_ROUNDS = (5, 100) if ON_GPU else (3, 10)
# Calls before the timed pass over the input sets: compilation, autotuning, cuDNN's search and CUDA-graph
# recording happen in the first calls (a CUDA graph is recorded on the second).
WARMUP_CALLS = 3 if ON_GPU else 1

RESULTS = []  # every row measured in this process, in order (also appended to the run's results file)
PROFILES = []  # every kernel profile made in this process (bench_kernel_profile), in order, also appended there


# ---------------------------------------------------------------------------------------------
# Clock and input rotation
# ---------------------------------------------------------------------------------------------
_origin = None


def reset_device_clock():
    """Start device_clock from zero: CUDA event times are float32 milliseconds, precise near zero."""
    global _origin
    if ON_GPU:
        _origin = torch.cuda.Event(enable_timing=True)
        _origin.record()
        _origin.synchronize()


def device_clock() -> float:
    """Seconds on the device's clock; on a GPU it waits for all queued work first (a CUDA event)."""
    if not ON_GPU:
        return time.perf_counter()
    if _origin is None:
        reset_device_clock()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    return _origin.elapsed_time(event) / 1e3


def total_bytes(tensors) -> int:
    """Bytes of the distinct tensors (by storage address) among `tensors`."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
    return sum(seen.values())


def input_rotation(make_inputs):
    """Input sets, each a tuple from make_inputs(), at least two and together more than twice the GPU's L2
    cache at every size (batch 1 at 256x256 in bfloat16 takes about 300 sets on an H200): every call reads
    its inputs from memory, as a stream of new images would. On CPU, two sets (CPU runs only compare our
    reference backend with eager code, and stay short)."""
    first = make_inputs()
    count = 2
    if ON_GPU:
        l2 = torch.cuda.get_device_properties(DEVICE).L2_cache_size
        count = max(2, 2 * l2 // max(total_bytes(first), 1) + 1)
    return [first] + [make_inputs() for _ in range(count - 1)]


# ---------------------------------------------------------------------------------------------
# The timing helper
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """Minimal work of one call (see the module docstring)."""

    bytes: int
    flops: int
    images: int


def measure(benchmark, step, input_sets, work: Work, **labels) -> dict:
    """Time `step(*inputs)` over the rotating `input_sets` with pytest-benchmark and record the row.

    labels: what the row is (group, op, provider, dtype, batch, size, mode); they go into the row,
    into pytest-benchmark's extra_info and so into its JSON.
    """
    sets = itertools.cycle(input_sets)

    def call():
        step(*next(sets))

    warmup_start = time.perf_counter()
    for _ in range(WARMUP_CALLS):
        call()
    reset_device_clock()
    start = device_clock()
    for _ in range(len(input_sets)):  # still warm-up (each set once), timed to size the rounds
        call()
    per_call = (device_clock() - start) / len(input_sets)
    warmup_s = time.perf_counter() - warmup_start
    iterations = max(1, round(ROUND_S / max(per_call, 1e-9)))
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(CASE_S / (per_call * iterations))))
    benchmark.group = labels["group"]
    benchmark.pedantic(call, rounds=rounds, iterations=iterations)
    stats = benchmark.stats.stats
    labels = {k: dtype_name(v) if isinstance(v, torch.dtype) else v for k, v in labels.items()}
    row = dict(labels, **asdict(work), median_s=stats.median, q1_s=stats.q1, q3_s=stats.q3, rounds=rounds,
               iterations=iterations, warmup_s=round(warmup_s, 3),
               peak_bytes=call_peak_bytes(call) if ON_GPU else None)
    benchmark.extra_info.update(row)
    row["test"] = benchmark.fullname
    RESULTS.append(row)
    results.record("row", **row)
    return row


def call_peak_bytes(call) -> int:
    """Device memory one call allocates at its peak beyond what was allocated before it: activations,
    gradients, workspaces and outputs, not the resident weights, optimizer state and input sets."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def count_flops(fn, *args) -> int:
    """Convolution and matmul FLOPs of one call of fn(*args) (which runs once)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# Providers and per-op cases
# ---------------------------------------------------------------------------------------------
def timed_fn(provider: str, fn):
    """fn itself, or for a compile-* provider fn under torch.compile, each call marked as a new CUDA-graph
    step (max-autotune replays CUDA graphs; outputs of earlier calls are never reused here)."""
    if not provider.startswith("compile-"):
        return fn
    compiled_fn = compiled(fn, provider)

    def run(*inputs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled_fn(*inputs)

    return run


def cuda_graphed(fn, example_inputs):
    """fn(*inputs) captured once in a CUDA graph on static copies of example_inputs, as `lfm predict` captures
    it (lfm.engines.capture_cuda_graph: warm-up calls on a side stream for compilation, autotuning and
    allocations; the ops' weights derived once); each call copies its inputs into the static ones and
    replays the graph, returning the graph's output tensor."""
    from lfm.engines import capture_cuda_graph

    static = [t.clone() for t in example_inputs]
    graph, out, weights = capture_cuda_graph(fn, static, WARMUP_CALLS)

    def replay(*inputs):
        for target, source in zip(static, inputs):
            target.copy_(source)
        graph.replay()
        return out

    replay.weights = weights  # the derived weights the graph reads live as long as the replay function
    return replay


def bench_op(benchmark, *, op: str, provider: str, dtype, mode: str, eager, fused, make_inputs, params=(),
             input_grad: bool = True, forward_bytes=None):
    """Benchmark one op for one provider: eager(*inputs), the authors' way (also what torch.compile gets),
    against fused(*inputs, backend=provider), our op; both read `params` besides the rotating inputs.

    forward: the op under torch.no_grad(). forward+backward: the op, then torch.autograd.grad of its output
    with respect to the params that require grad and, with input_grad, the floating-point inputs.
    forward_bytes(inputs, out): the forward's minimal bytes when they are not "read every input and
    parameter once, write the output once" (an op that needs only part of its input).
    """
    backward = mode == FORWARD_BACKWARD
    input_sets = input_rotation(make_inputs)
    if backward and input_grad:
        for inputs in input_sets:
            for t in inputs:
                if t.is_floating_point():
                    t.requires_grad_(True)
    params = list(params)
    first = input_sets[0]
    fn = functools.partial(fused, backend=provider) if provider in LFM_BACKENDS else timed_fn(provider, eager)

    def step(*inputs):
        out = fn(*inputs)
        if backward:
            torch.autograd.grad(out, [t for t in (*inputs, *params) if t.requires_grad], grad_out)

    with torch.set_grad_enabled(backward):
        out = eager(*first)
        grad_out = torch.randn_like(out)
        # .backward() here, not autograd.grad: FlopCounterMode's module hooks reject the latter.
        flops = count_flops(lambda *x: eager(*x).backward(grad_out) if backward else eager(*x), *first)
        for t in (*first, *params):
            t.grad = None
        moved = forward_bytes(first, out) if forward_bytes else total_bytes([*first, *params, out])
        if backward:
            moved += total_bytes([out]) + total_bytes([t for t in (*first, *params) if t.requires_grad])
        images = len(first[0])
        return measure(benchmark, step, input_sets, Work(moved, flops, images), group=f"op: {op}", op=op,
                       provider=provider, dtype=dtype, batch=images, size=shapes.IMAGE_SIZE, mode=mode)
