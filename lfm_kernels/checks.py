"""Argument checks the ops share: each raises ValueError naming the offending value, before any launch."""
import torch

from .backend import plain_eager

# The Triton selection runs k rounds of "max, remove" over tiles of at most 2 * MAX_KERNEL_K candidates
# per row: beyond that a round costs more than a sort, and the tiles no longer fit in registers.
MAX_KERNEL_K = 1024
# Signatures (see once_per_signature) whose checks passed; cleared when full, a bound no model reaches.
_PASSED = set()
_PASSED_LIMIT = 4096


def tensors_signature(*tensors) -> list:
    """What argument checks read of arguments that should be tensors, flat: each one's shape, dtype and
    device, else its type (NoneType for an optional tensor left out; anything else fails its check, so it
    is never stored). Flat because hashing and comparing the key cost host time per nested tuple; a type
    never equals a shape, so no two argument lists share one."""
    signature = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            signature += (t.shape, t.dtype, t.device)
        else:
            signature.append(type(t))
    return signature


def flag_signature(v):
    """A non-tensor argument in a signature: itself when it is None, a bool, an int or a str (with its type:
    True == 1), else its type (such a value fails its check, never stored)."""
    return (type(v), v) if v is None or type(v) in (bool, int, str) else type(v)


def once_per_signature(check, signature, x, *args):
    """check(x, *args) unless a call with the same signature(x, *args) passed it before. For checks that read
    only what the signature holds (shapes, dtypes, devices, flags, autocast state), never tensor values: a
    signature that passed passes again, and a failing call stores nothing, so bad input raises the same
    ValueError every time. Saves the checks' host time on repeated calls (batch-1 latency). Plain eager
    calls only (backend.plain_eager on x): traced shapes may be symbolic, which do not hash."""
    if not plain_eager(x):
        return check(x, *args)
    key = (check, *signature(x, *args))
    if key in _PASSED:
        return
    check(x, *args)
    if len(_PASSED) >= _PASSED_LIMIT:
        _PASSED.clear()
    _PASSED.add(key)


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


def check_k(k, positions: int):
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if k < 1 or k > positions:
        raise ValueError(f"k must be in [1, H*W={positions}], got k={k}")


def check_kernel_k(k: int):
    """The Triton backend's bound on k (after check_k)."""
    if k > MAX_KERNEL_K:
        raise ValueError(f"backend='triton' supports k <= {MAX_KERNEL_K}, got k={k}; use backend='torch' for larger k")
