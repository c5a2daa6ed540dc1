"""Dtypes and dot precision: what the kernels take, what their dots compute in, and autocast."""
import functools
import types

import torch

from .configs import KERNELS_INTERPRETED

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PRECISIONS = ("tf32", "ieee")


def check_kernel_dtype(name: str, x: torch.Tensor):
    """The Triton kernels compute in float32 and take float32, float16 and bfloat16 inputs."""
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"backend='triton' takes float32, float16 or bfloat16 for {name}, got {x.dtype}")


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
    return dict(_dot_args(dtype, precision))


@functools.lru_cache(maxsize=None)
def gemm_dot_args(dtype: torch.dtype, precision: str) -> types.MappingProxyType:
    """dot_args for kernels whose operands are already in the conv's dtype (packed weights, NHWC inputs
    cast by conv_input): only what tl.dot gets (DOT_DTYPE) and PRECISION. Memoized, read-only (every
    launch asks)."""
    dots = _dot_args(dtype, precision)
    return types.MappingProxyType(dict(DOT_DTYPE=dots["DOT_DTYPE"], PRECISION=dots["PRECISION"]))


@functools.lru_cache(maxsize=None)
def _dot_args(dtype: torch.dtype, precision: str) -> dict:
    """dot_args' constexprs, memoized (launchers ask on every launch); callers copy, never mutate."""
    operand = _tl_dtype(dtype)
    dot = _tl_dtype(torch.float32) if dtype == torch.bfloat16 and KERNELS_INTERPRETED else operand
    return dict(OPERAND_DTYPE=operand, DOT_DTYPE=dot, PRECISION=precision if dtype == torch.float32 else "tf32")


def autocast_enabled(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device (CUDA or CPU; no other device has it here)."""
    if x.is_cuda:
        return torch.is_autocast_enabled("cuda")
    return x.is_cpu and torch.is_autocast_enabled("cpu")


def autocast_dtype(x: torch.Tensor):
    """The dtype autocast would run a convolution on x in (None outside autocast), as F.conv2d does."""
    if autocast_enabled(x) and x.dtype == torch.float32:
        return torch.get_autocast_dtype(x.device.type)
    return None


def check_conv_dtypes(**tensors):
    """Refuse what F.conv2d refuses: operands of different dtypes, outside autocast (which casts them to one);
    the first tensor's device says which autocast applies. Both backends call it."""
    given = {name: t for name, t in tensors.items() if t is not None}
    if autocast_enabled(next(iter(given.values()))):
        return
    if len({t.dtype for t in given.values()}) > 1:
        listing = ", ".join(f"{n} {t.dtype}" for n, t in given.items())
        raise ValueError(f"tensors must have one dtype, got {listing}")


def conv_input(name: str, x: torch.Tensor, keep_dtype: bool = False):
    """(x as the kernels take it, the dtype the conv computes in). Under autocast the conv computes in
    autocast's dtype, as F.conv2d would (accumulation and statistics stay float32); with keep_dtype (the
    stem) x stays in its own dtype, so the neighbor-pixel residual is taken before rounding, as the
    reference does."""
    compute_dtype = autocast_dtype(x) or x.dtype
    if not keep_dtype and x.dtype != compute_dtype:
        x = x.to(compute_dtype)
    check_kernel_dtype(name, x)
    return x, compute_dtype
