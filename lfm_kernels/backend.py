"""Backend switch and the input checks every fused op shares.

Backends:
  "torch"  - the pure-PyTorch reference of each op; runs on any device.
  "triton" - the Triton kernels; CUDA tensors, or CPU tensors when TRITON_INTERPRET=1.
  "auto"   - triton for CUDA tensors, torch otherwise (the default).
The default comes from the environment variable LFM_BACKEND when it is set.
"""
import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "LFM_BACKEND"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend_name(backend):
    """Return the backend name (None reads LFM_BACKEND), raising ValueError on an unknown one."""
    if backend is None:
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend, tensor: torch.Tensor) -> str:
    """Pick "torch" or "triton" for an op whose main input is `tensor`."""
    backend = check_backend_name(backend)
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend == "triton" and not tensor.is_cuda and not interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got a tensor on {tensor.device}); "
            "on CPU set TRITON_INTERPRET=1 before importing triton, or use backend='torch'"
        )
    return backend


def check_float_tensor(name: str, x, ndim: int):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"{name} has unsupported dtype {x.dtype}")


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


# The Triton selection runs k rounds of "max, remove" over tiles of at most 2 * MAX_KERNEL_K candidates
# per row: beyond that a round costs more than a sort, and the tiles no longer fit in registers.
MAX_KERNEL_K = 1024


def check_k(k, positions: int):
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if k < 1 or k > positions:
        raise ValueError(f"k must be in [1, H*W={positions}], got k={k}")


def check_kernel_k(k: int):
    """The Triton backend's bound on k (after check_k)."""
    if k > MAX_KERNEL_K:
        raise ValueError(f"backend='triton' supports k <= {MAX_KERNEL_K}, got k={k}; use backend='torch' for larger k")


def check_drop(drop):
    """Validate drop=(pmin, pmax) and return it as floats (None stays None)."""
    if drop is None:
        return None
    try:
        pmin, pmax = (float(p) for p in drop)
    except (TypeError, ValueError):
        raise ValueError(f"drop must be None or a pair (pmin, pmax), got {drop!r}") from None
    for p in (pmin, pmax):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop probabilities must lie in [0, 1), got {drop!r}")
    if pmin > pmax:
        raise ValueError(f"drop needs pmin <= pmax, got pmin={pmin} > pmax={pmax}")
    return pmin, pmax


def rank_drop_probs(k: int, pmin: float, pmax: float, device=None) -> torch.Tensor:
    """Drop probability per rank (0 = largest): pmax at rank 0 falling linearly to pmin at rank k-1.

    With k == 1 the single value gets the mean (pmin + pmax) / 2.
    """
    if k == 1:
        return torch.full((1,), (pmin + pmax) / 2, dtype=torch.float32, device=device)
    return torch.linspace(pmax, pmin, k, dtype=torch.float32, device=device)


def dropout_scale(pmin: float, pmax: float) -> float:
    """Survivors are scaled by 1 / (1 - mean p); the mean of a linear ramp is its midpoint."""
    return 1.0 / (1.0 - (pmin + pmax) / 2)


def draw_seed(device) -> torch.Tensor:
    """Philox (seed, offset) drawn from torch's generator, so torch.manual_seed reproduces a run.

    A tensor, not Python ints, so the draw stays inside a torch.compile graph.
    """
    return torch.randint(0, 2**31 - 1, (2,), device=device, dtype=torch.int64)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


PRECISIONS = ("tf32", "ieee")


def check_precision(input_precision):
    if input_precision is not None and input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be None or one of {PRECISIONS}, got {input_precision!r}")


def conv_tf32_enabled() -> bool:
    """Whether torch lets cuDNN convolutions use TF32 for float32 (torch.backends.cudnn.allow_tf32, or
    the newer torch.backends.cudnn.conv.fp32_precision; the legacy getter refuses a mix of the two)."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return torch.backends.cudnn.conv.fp32_precision == "tf32"


def resolve_precision(input_precision) -> str:
    """"tf32" or "ieee" for float32 tensor-core dots: an explicit choice, else what torch's cuDNN switch
    says, so that turning TF32 off for convolutions turns it off for ours too."""
    check_precision(input_precision)
    if input_precision is not None:
        return input_precision
    return "tf32" if conv_tf32_enabled() else "ieee"


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def dot_args(dtype: torch.dtype, precision: str) -> dict:
    """Constexprs for tl.dot on operands computed in `dtype` (the input's, or autocast's):
    OPERAND_DTYPE, what operands are rounded to; DOT_DTYPE, what tl.dot gets (the interpreter of triton
    3.9 computes bfloat16 dots wrongly, so there rounded bf16 values are widened to float32, exactly);
    PRECISION, "tf32" or "ieee" for float32 (16-bit operands use their own tensor-core path)."""
    operand = _tl_dtype(dtype)
    dot = _tl_dtype(torch.float32) if dtype == torch.bfloat16 and interpreter_enabled() else operand
    return dict(OPERAND_DTYPE=operand, DOT_DTYPE=dot, PRECISION=precision if dtype == torch.float32 else "tf32")


_gpu_tiles_in_interpreter = False


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


def interpreter_tiles() -> bool:
    """Whether launchers pick the interpreter's tiles: the interpreter pays per operation, not per
    element, so it gets tiles about 4x larger; results never depend on tiling."""
    return interpreter_enabled() and not _gpu_tiles_in_interpreter


def tile_size(n: int, cap: int) -> int:
    """A power-of-2 block covering n, at least 16 (tl.dot's minimum) and at most `cap` (4x under the
    interpreter's tiles)."""
    return min(cap * 4 if interpreter_tiles() else cap, max(16, 1 << (n - 1).bit_length()))


def on_input_device(op):
    """Run a launcher with the device of its first tensor argument current, so Triton launches on that
    GPU and on torch's current stream for it (a model on cuda:1 while cuda:0 is current)."""

    @functools.wraps(op)
    def launch(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or first.device.type != "cuda":
            return op(*args, **kwargs)
        with torch.cuda.device(first.device):
            return op(*args, **kwargs)

    return launch


def autocast_dtype(x: torch.Tensor):
    """The dtype autocast would run a convolution on x in (None outside autocast), as F.conv2d does."""
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind) and x.dtype == torch.float32:
        return torch.get_autocast_dtype(kind)
    return None


def check_kernel_dtype(name: str, x: torch.Tensor):
    """The Triton kernels compute in float32 and take float32, float16 and bfloat16 inputs."""
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"backend='triton' takes float32, float16 or bfloat16 for {name}, got {x.dtype}")
