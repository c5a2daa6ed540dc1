"""The backend switch, and the device guard every launcher runs under.

Backends:
  "torch"  - the pure-PyTorch implementation of each op; runs on any device.
  "triton" - the Triton kernels; CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (or while
             configs.observe_launches stubs launches out: the compile report, host-time benchmarks).
  "auto"   - triton for CUDA tensors, torch otherwise (the default); on a GPU family where a GPU run of
             these kernels measured the cuDNN composition faster for an op (configs.auto_backend), torch.
The default comes from the environment variable LFM_BACKEND when it is set.
"""
import functools
import os

import torch

from .configs import auto_backend, interpreter_enabled, launches_stubbed

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "LFM_BACKEND"


def check_backend_name(backend):
    """Return the backend name (None reads LFM_BACKEND), raising ValueError on an unknown one."""
    if backend is None:
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend, tensor: torch.Tensor, op: str = "", training: bool = False) -> str:
    """Pick "torch" or "triton" for `op` (its name in configs.auto_backend's table) on its main input
    `tensor`, in training (batch statistics or gradients) or inference."""
    backend = check_backend_name(backend)
    if backend == "auto":
        return auto_backend(op, tensor, training)
    if backend == "triton" and not tensor.is_cuda and not (launches_stubbed() or interpreter_enabled()):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got a tensor on {tensor.device}); "
            "on CPU set TRITON_INTERPRET=1 before importing triton, or use backend='torch'"
        )
    return backend


def plain_eager(x: torch.Tensor) -> bool:
    """Whether a launcher may run directly instead of through its torch.library custom op: eager code on a
    plain tensor, with no torch.compile tracing, no dispatch or torch-function mode (fake tensors, export,
    FlopCounterMode) and no functorch transform (vmap) active. Those see the custom op, as before; plain
    eager code skips the dispatcher's host time, which at batch 1 rivals the launches'."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()
            and not torch._C._is_torch_function_mode_enabled() and torch._C._functorch.peek_interpreter_stack() is None)


def call_op(op, launcher, x, *args):
    """launcher(x, *args) in plain eager code (plain_eager), else op(x, *args): the custom op that wraps
    the same launcher, for torch.compile, fake tensors and vmap. Also the op where autograd would record the
    call (grad mode on, a tensor argument requiring grad: a backward op under create_graph=True), so that
    differentiating its outputs raises the op's "no autograd formula" error instead of silently dropping
    a term: the launcher's outputs have no autograd history."""
    if plain_eager(x) and not (torch.is_grad_enabled() and _any_requires_grad(x, *args)):
        return launcher(x, *args)
    return op(x, *args)


def _any_requires_grad(*args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def on_input_device(op):
    """Run a launcher with the device of its first tensor argument current, so Triton launches on that
    GPU and on torch's current stream for it (a model on cuda:1 while cuda:0 is current)."""

    @functools.wraps(op)
    def launch(*args, **kwargs):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else next(
            (a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)  # the usual case first
        if first is None or not first.is_cuda or first.device.index == torch.cuda.current_device():
            return op(*args, **kwargs)  # already current: no device guard to enter and leave (host time)
        with torch.cuda.device(first.device):
            return op(*args, **kwargs)

    return launch


def register_autograd(op, launcher, backward, setup_context):
    """op.register_autograd for a custom op whose first output is its only differentiable one; returns the
    op's differentiable call. Autograd leaves the gradients of the other outputs (indices, statistics)
    undefined instead of filling them with zeros (ctx.set_materialize_grads(False): on a GPU each fill is a
    launch), and when the first output gets no gradient from downstream, neither do the inputs.

    The call runs, in plain eager code (plain_eager), a torch.autograd.Function around `launcher` (the
    op's implementation) with the same setup and backward (the launcher alone when nothing needs a
    gradient), else the op: torch.library's autograd layer re-reads the op's schema once per argument on
    every call (about 30 us of host time for a 13-argument op), which a training step pays once per op."""

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)

    def differentiate(ctx, grad, *others):
        if grad is None:
            return (None,) * len(ctx.needs_input_grad)
        return backward(ctx, grad, *others)

    op.register_autograd(differentiate, setup_context=setup)

    def forward(ctx, *inputs):
        output = launcher(*inputs)
        setup(ctx, inputs, output)
        return output

    # Named after the op: grad_fn and profiler traces show <op>Backward.
    function = type(launcher.__name__.strip("_"), (torch.autograd.Function,),
                    dict(forward=staticmethod(forward), backward=staticmethod(differentiate)))

    def call(x, *args):
        if torch.is_grad_enabled() and _any_requires_grad(x, *args) and plain_eager(x):
            return function.apply(x, *args)
        return call_op(op, launcher, x, *args)

    return call


def batch_folding_vmap(op):
    """A torch.func.vmap rule for a custom op whose first argument and every output lead with the batch
    dimension and whose other tensor arguments are per call (weights, seeds): the vmapped dimension joins
    the batch, one launch for all."""

    def rule(info, in_dims, x, *rest):
        if any(d is not None for d in in_dims[1:]):
            raise ValueError(f"vmap over {op._name} batches its first argument only, got in_dims={in_dims}")
        n = info.batch_size
        out = op(x.movedim(in_dims[0], 0).flatten(0, 1), *rest)
        if isinstance(out, tuple):
            return tuple(t.unflatten(0, (n, -1)) for t in out), (0,) * len(out)
        return out.unflatten(0, (n, -1)), 0

    return rule
