"""Where and how the models run: device, precision, and the process group under torchrun.

`torchrun --nproc_per_node=N -m lfm ...` starts N processes with RANK, LOCAL_RANK and WORLD_SIZE set;
each takes one device (cuda:LOCAL_RANK on GPU) and they talk through gloo on CPU and nccl on GPU.
A plain `lfm ...` is a world of one, and every collective below is then a no-op.
"""
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UsageError

PRECISIONS = ("float32", "bf16", "float64")


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_device(name: str | None) -> torch.device | None:
    """The device a --device value names (None for "auto"), or a UsageError: lfm runs on cpu and cuda only,
    and a CUDA device must exist."""
    if name in (None, "auto"):
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} cannot run lfm; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)")
    return device


def pick_device(name: str | None, local_rank: int = 0) -> torch.device:
    """"auto" (or None) -> cuda when available, else cpu; a bare "cuda" means this rank's GPU."""
    device = check_device(name) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def check_backend(backend: str | None, device: torch.device, precision: str = "float32"):
    """Refuse a backend that cannot run on `device`, or in `precision`, before any image is read."""
    from lfm_kernels.configs import interpreter_enabled

    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise UsageError(f"--backend triton needs a CUDA device (device is {device}; on CPU only with "
                         "TRITON_INTERPRET=1); use --backend auto or torch")
    if precision == "float64" and (backend == "triton" or backend in (None, "auto") and device.type == "cuda"):
        raise UsageError("--precision float64 runs on the torch backend only (the Triton kernels take 32- and "
                         "16-bit floats); add --backend torch")


@contextmanager
def session(device_name: str | None = None, backend: str | None = None, precision: str = "float32"):
    """Yield the Context of this process, joining (and finally leaving) the process group under torchrun.
    The device and the backend (for `precision`) are checked first."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    check_backend(backend, device, precision)
    if world_size == 1:
        yield Context(device=device)
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Context(dist.get_rank(), dist.get_world_size(), device)
        # Rank 0 may still be writing files: a rank that tore the group down now would abort in gloo.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of the weights, the inputs, the logits and the loss: float64 for "float64" (slower, and the
    same numbers on any CPU to many more digits), float32 otherwise (bf16 autocasts inside a float32 model)."""
    return torch.float64 if precision == "float64" else torch.float32


def autocast(device: torch.device, precision: str):
    """bf16 autocast for "bf16"; a disabled autocast (plain float32) otherwise."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def all_gather(obj, ctx: Context) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if not ctx.distributed:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank when `flag` is true on at least one, so all ranks take the same branch."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_buffers(module: torch.nn.Module, ctx: Context):
    """Give every rank rank 0's buffers (BatchNorm running statistics). DistributedDataParallel only
    syncs them at the start of a training forward, so after an epoch each rank holds its own."""
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def bar_disabled(progress: bool | None, ctx: Context):
    """tqdm's `disable` for a progress bar shown by rank 0 only: None (automatic) lets tqdm show it when
    stderr is a terminal."""
    if not ctx.is_main:
        return True
    return None if progress is None else not progress


_interrupted = threading.Event()


def _on_sigint(signum, frame):
    _interrupted.set()
    raise KeyboardInterrupt


@contextmanager
def interrupt_guard():
    """Make Ctrl-C stick. A KeyboardInterrupt raised where Python cannot propagate it (an at-fork hook
    while the data loader starts its workers) is swallowed; the flag set here lets the loops stop at
    their next `raise_if_interrupted`, and the swallowed one is not printed."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    previous_handler, previous_hook = signal.signal(signal.SIGINT, _on_sigint), sys.unraisablehook

    def quiet_interrupts(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)

    sys.unraisablehook = quiet_interrupts
    _interrupted.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        sys.unraisablehook = previous_hook
        _interrupted.clear()


def raise_if_interrupted():
    """Raise KeyboardInterrupt if Ctrl-C came while in interrupt_guard, even if it was swallowed."""
    if _interrupted.is_set():
        raise KeyboardInterrupt
