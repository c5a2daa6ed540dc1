"""Bytes moved and kernel launches per image, for one inference forward and one training step, without a GPU.

Each provider's model runs on meta tensors (shapes and dtypes, nothing computed) under `TrafficCounter`, a
TorchDispatchMode that sees every op reaching the dispatcher:
- an op reads its tensor inputs and writes its fresh outputs and the inputs it mutates (in-place ops
  read and write), each counted at its size (the distinct elements it addresses);
- each such op is one kernel launch, except an op that launches our Triton kernels (lfm_kernels.configs.
  observe_launches sees them): it counts the kernels it launches, and the torch ops it issues around them
  (merging per-program partial sums, casting, filling buffers) are counted as ops of their own, each a
  launch on a GPU as any other (our custom ops run with the ops inside them dispatched). The triton
  provider runs on real CPU tensors with every launch stubbed out (observe_launches with run=False),
  launching as an H100/H200 does (configs.gpu_family("sm90")), so that our fused ops (torch.ops.lfm.*)
  count their kernels; the other providers run on meta tensors, so that they take no CPU-only path (the torch
  backend's cache-sized chunks and CPU training path): they compose as on a GPU;
- views and metadata ops (view, reshape, expand, permute, detach, t, ...), allocations and queries
  (shape, device) move nothing and launch nothing; filling a fresh allocation from weights alone (packing a
  weight for a GEMM) is weight preprocessing.
That is the traffic of running each op as one kernel that reads its inputs once and writes its outputs
once, which is about what eager PyTorch does on a GPU. torch.compile providers are left out: Inductor
fuses after dispatch, so a dispatch-level count does not describe them.

Counts are of a steady-state call. Inference leaves out weight preprocessing (ops that read only
parameters and buffers, such as casting weights or folding BatchNorm into a conv), which a deployment
can do once; our fused ops do none (they apply BatchNorm inside the kernels).
A training step is zero_grad, forward, BCE-with-logits, backward and a fused Adam step, counted after
one uncounted step has created Adam's state. Launches are per call, bytes per image (total / batch).

    python -m bench.ledger [--batch 32] [--by-op]
"""
import argparse
import contextlib
from collections import Counter
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.nn.functional as F
from torch._library.custom_ops import _maybe_get_opdef
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from bench.providers import build_model, dtype_name
from bench.shapes import IMAGE_SIZE, SIZES, TRAIN_BATCH
from bench.workloads import cpu_tensors_take_the_triton_path
from lfm_kernels.configs import gpu_family, gpu_tile_sizes, observe_launches

LEDGER_PROVIDERS = ("eager", "torch", "triton")
LEDGER_DTYPES = (torch.float32, torch.bfloat16)
LEDGER_SIZES = SIZES
LEDGER_BATCH = TRAIN_BATCH
# Ops that return fresh tensors without computing anything (allocations, view-like ops whose schema
# does not say so); ops whose results all alias an input are recognized from the schema.
NO_KERNEL_OPS = {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided",
                 "_unsafe_view"}
# Factories that take a tensor only for its shape, dtype and device: they write but do not read it.
LIKE_FACTORY_OPS = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "rand_like",
                    "randn_like", "randint_like"}
MB = 1e6


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements `t` addresses (a stride-0, expanded dim counts once)."""
    if t.numel() == 0:
        return 0
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


def _tensors(value):
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def op_traffic(func, args, kwargs, out):
    """(bytes read + written, launches) of one dispatched op; (0, 0) for views, allocations and queries."""
    schema = func._schema
    mutated = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            mutated += _tensors(args[i] if i < len(args) else kwargs.get(arg.name))
    fresh = [t for ret, value in zip(schema.returns, out if isinstance(out, (tuple, list)) and len(schema.returns) > 1
                                      else [out])
             if ret.alias_info is None for t in _tensors(value)]
    name = func.overloadpacket.__name__
    if name in NO_KERNEL_OPS or not (mutated or fresh):
        return 0, 0
    read = [] if name in LIKE_FACTORY_OPS else _tensors((args, kwargs))
    return sum(map(tensor_bytes, read + mutated + fresh)), 1


@dataclass
class Traffic:
    bytes: int = 0
    launches: int = 0
    by_op: Counter = field(default_factory=Counter)  # op name -> bytes
    launches_by_op: Counter = field(default_factory=Counter)

    def add(self, name: str, moved: int, launches: int):
        self.bytes += moved
        self.launches += launches
        self.by_op[name] += moved
        self.launches_by_op[name] += launches


def custom_op_implementation(func, tensors):
    """The Python function behind a torch.library.custom_op (ours), to run with the ops inside it dispatched;
    None for an op of ATen or one defined otherwise, and on fake or meta tensors (the op's fake
    implementation runs, nothing inside it)."""
    if func.namespace in ("aten", "prims") or any(isinstance(t, FakeTensor) or t.is_meta for t in tensors):
        return None
    definition = _maybe_get_opdef(func)
    return definition and definition._init_fn


class TrafficCounter(TorchDispatchMode):
    """Sums `op_traffic` over every op dispatched while active (see the module docstring). A custom op (ours:
    torch.ops.lfm.*) runs under a nested counter, so that the torch ops it issues around its kernels count as
    the launches they are on a GPU; the op itself counts the Triton kernels of lfm_kernels that it launches
    (not those of a custom op it calls), or one launch when nothing inside it was visible (fake tensors, or
    an op that launched nothing, such as on an empty batch).

    weights: the model's parameters and buffers. An op that reads only these, or what such ops made,
    is weight preprocessing (folding BatchNorm into a conv, say), which a deployment can do once, not
    per call, so it goes to `weight_traffic`, not `traffic`.
    """

    def __init__(self, weights=(), outer=None):
        super().__init__()
        self.outer = outer or self  # the counter that holds the totals
        if outer is None:
            self.traffic = Traffic()
            self.weight_traffic = Traffic()
            self.weight_made = WeakIdKeyDictionary({w: True for w in weights})
            self.allocated = WeakIdKeyDictionary()  # fresh allocations (an op filling one writes, reads nothing)
            self.kernel_launches = 0  # every Triton launch seen
            self.kernels_counted = 0  # those counted for the op that launched them
            self.counted_launches = 0  # launches counted so far, kernels and torch ops alike
            self._observing = None

    def __enter__(self):
        if self.outer is self:
            self._observing = observe_launches(self._count_launch)
            self._observing.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self.outer is self:
                self._observing.__exit__(*exc)

    def _count_launch(self, launch):
        self.kernel_launches += 1
        for t in _tensors(launch.args):  # a kernel may write any tensor it takes: no longer a fresh allocation
            self.allocated.pop(t, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        root = self.outer
        before = (root.kernel_launches, root.kernels_counted, root.counted_launches)
        inputs = _tensors((args, kwargs))
        implementation = custom_op_implementation(func, inputs)
        if implementation is None:
            out = func(*args, **kwargs)
        else:  # one of ours: what it runs inside counts too
            with TrafficCounter(outer=root):
                out = implementation(*args, **kwargs)
        # Kernels this op launched itself: all launched meanwhile, less those counted for custom ops inside it.
        kernels = (root.kernel_launches - before[0]) - (root.kernels_counted - before[1])
        visible_inside = root.counted_launches > before[2]
        # Weight preprocessing: reads weights (or what such ops made) and at most fresh allocations it fills.
        weight_only = any(t in root.weight_made for t in inputs) and all(
            t in root.weight_made or t in root.allocated for t in inputs)
        if weight_only:  # views of weights included
            root.weight_made.update({t: True for t in _tensors(out)})
        if func.overloadpacket.__name__ in NO_KERNEL_OPS and not inputs:
            root.allocated.update({t: True for t in _tensors(out)})
        moved, launches = op_traffic(func, args, kwargs, out)
        if launches and (kernels or visible_inside):
            launches = kernels
        if launches:
            (root.weight_traffic if weight_only else root.traffic).add(str(func.overloadpacket), moved, launches)
            for t in _tensors(out):  # written: no longer a fresh allocation
                root.allocated.pop(t, None)
            root.counted_launches += launches
            root.kernels_counted += kernels
        return out


@contextlib.contextmanager
def stubbed_launches():
    """Our kernels' launches stubbed out, as an H100/H200 makes them, on CPU tensors."""
    with cpu_tensors_take_the_triton_path(), gpu_family("sm90"), gpu_tile_sizes(), \
            observe_launches(run=False):
        yield


@contextlib.contextmanager
def fused_adam_on_meta():
    """Adam(fused=True) on meta parameters: its fused kernel has a meta implementation, but torch.optim's
    device check does not list meta."""
    with mock.patch("torch.optim.adam._device_dtype_check_for_fused", lambda *args, **kwargs: None):
        yield


def model_traffic(provider: str, dtype=torch.float32, size: int = IMAGE_SIZE, batch: int = LEDGER_BATCH,
                  training: bool = False) -> Traffic:
    """Traffic of one inference forward (or one training step) of `provider`'s model: on CPU tensors with
    launches stubbed out for the triton provider, on meta tensors for the others."""
    device = "cpu" if provider == "triton" else "meta"
    model = build_model(provider, dtype, "cpu", training).to(device)
    with stubbed_launches() if provider == "triton" else fused_adam_on_meta():
        x = torch.randn(batch, 3, size, size, dtype=dtype, device=device)
        if not training:
            with torch.no_grad(), TrafficCounter(weights=[*model.parameters(), *model.buffers()]) as counter:
                model(x)
            return counter.traffic
        y = torch.randint(0, 2, (batch, 1), device=device).to(dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999), fused=True)

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(x), y).backward()
            optimizer.step()

        step()  # creates Adam's state
        with TrafficCounter() as counter:
            step()
        return counter.traffic


@dataclass(frozen=True)
class LedgerRow:
    provider: str
    dtype: torch.dtype
    size: int
    batch: int
    inference: Traffic
    training: Traffic

    def bytes_per_image(self, training: bool = False) -> float:
        return (self.training if training else self.inference).bytes / self.batch


def ledger(providers=LEDGER_PROVIDERS, dtypes=LEDGER_DTYPES, sizes=LEDGER_SIZES, batch=LEDGER_BATCH):
    return [LedgerRow(p, d, s, batch, model_traffic(p, d, s, batch), model_traffic(p, d, s, batch, training=True))
            for s in sizes for d in dtypes for p in providers]


def format_ledger(rows) -> str:
    """Markdown table; "x eager" is the share of the eager provider's bytes at the same dtype and size."""
    eager = {(r.dtype, r.size): r for r in rows if r.provider == "eager"}
    lines = [f"Bytes read + written per image and kernel launches per call, batch {rows[0].batch} "
             "(without a GPU: meta tensors; the triton provider's kernels stubbed out, launched as on an H100/H200)",
             "",
             "| size | dtype | provider | inference MB/img | x eager | launches | train step MB/img | x eager "
             "| launches |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = eager.get((r.dtype, r.size))
        cells = [f"{r.size}x{r.size}", dtype_name(r.dtype), r.provider]
        for training in (False, True):
            mb = r.bytes_per_image(training) / MB
            share = f"{r.bytes_per_image(training) / base.bytes_per_image(training):.2f}" if base else "-"
            cells += [f"{mb:.1f}", share, str((r.training if training else r.inference).launches)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_by_op(rows) -> str:
    """Where each provider's inference bytes go, per op, largest first."""
    out = []
    for r in rows:
        t = r.inference
        out.append(f"\n{r.provider} {dtype_name(r.dtype)} {r.size}x{r.size} inference: "
                   f"{t.bytes / r.batch / MB:.1f} MB/img, {t.launches} launches")
        for name, moved in t.by_op.most_common():
            out.append(f"  {name:45s} {moved / r.batch / MB:9.2f} MB/img  {t.launches_by_op[name]:3d} launches")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=LEDGER_BATCH)
    parser.add_argument("--by-op", action="store_true", help="also list each provider's inference bytes per op")
    args = parser.parse_args(argv)
    rows = ledger(batch=args.batch)
    print(format_ledger(rows))
    if args.by_op:
        print(format_by_op(rows))


if __name__ == "__main__":
    main()
