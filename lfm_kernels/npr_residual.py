"""Neighbor-pixel residual (NPR): x minus the top-left pixel of its factor x factor cell.

out[b, c, i, j] = x[b, c, i, j] - x[b, c, f*(i//f), f*(j//f)], optionally abs().
For even sizes and f=2 this is exactly the authors' frozen down/up-sampling convolutions;
odd sizes work too (the last row/column forms a partial cell anchored at its own top-left).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .backend import call_op, on_input_device, register_autograd, resolve_backend
from .checks import check_float_tensor
from .configs import cdiv, launch, launch_config
from .precision import check_kernel_dtype


def npr_residual_reference(x: torch.Tensor, factor: int = 2, absolute: bool = True) -> torch.Tensor:
    h, w = x.shape[-2:]
    anchor = x[..., ::factor, ::factor]
    anchor = anchor.repeat_interleave(factor, dim=-2)[..., :h, :]
    anchor = anchor.repeat_interleave(factor, dim=-1)[..., :w]
    res = x - anchor
    return res.abs() if absolute else res


def npr_residual_inference(x):
    """|x - x[2*(i//2), 2*(j//2)]| (npr_residual_reference(x, 2, True)) through a view of 2x2 cells;
    an odd side is padded by one replicated row/column first and cropped after (its partial cell is
    anchored at its own top-left either way)."""
    H, W = x.shape[-2:]
    if H % 2 or W % 2:
        x = F.pad(x, (0, W % 2, 0, H % 2), mode="replicate")
    B, C, He, We = x.shape
    cells = x.reshape(B, C, He // 2, 2, We // 2, 2)
    res = cells - cells[:, :, :, :1, :, :1]
    res = (res.abs() if res.requires_grad else res.abs_()).view(B, C, He, We)  # in place unless differentiated
    return res[:, :, :H, :W]


@triton.jit
def _plane_pixels(C, H, W, sb, sc, BLOCK: tl.constexpr):
    """This program's BLOCK pixels p (int32) of plane (b, c) = program_id(1): liveness, row i, column j,
    the plane's int64 offset in x (through its strides) and in a contiguous (B, C, H, W) tensor."""
    bc = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i = p // W
    return p, p < H * W, i, p - i * W, (bc // C) * sb + (bc % C) * sc, bc * H * W


@triton.jit
def _npr_residual_fwd_kernel(
    x_ptr, out_ptr, C, H, W, sb, sc, sh, sw, factor,
    ABSOLUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Forward. Grid: (cdiv(H*W, BLOCK), B*C); one program per BLOCK pixels of one (b, c) plane.

    Reads each pixel and its anchor through x's strides (any layout), writes the contiguous
    (B, C, H, W) residual in x's dtype; arithmetic in float32. Index math is int32 within a plane
    (H*W < 2^31, checked by the launcher); only the plane's base offset is int64.
    """
    p, live, i, j, plane, out_at = _plane_pixels(C, H, W, sb, sc, BLOCK)
    x = tl.load(x_ptr + plane + i * sh + j * sw, mask=live, other=0.0).to(tl.float32)
    anchor = tl.load(x_ptr + plane + (i // factor * factor) * sh + (j // factor * factor) * sw,
                     mask=live, other=0.0).to(tl.float32)
    res = x - anchor
    if ABSOLUTE:
        res = tl.abs(res)
    tl.store(out_ptr + out_at + p, res.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _npr_residual_bwd_kernel(
    grad_ptr, x_ptr, dx_ptr, C, H, W, sb, sc, sh, sw, factor,
    ABSOLUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Backward. Grid: (cdiv(H*W, BLOCK), B*C); one program per BLOCK input pixels of one (b, c) plane.

    d x[p] = g[p] * s[p] - [p is an anchor] * sum over its cell q of g[q] * s[q], where s is the
    sign of the residual (0 at 0, as torch.abs) or 1 without abs. Each element gathers from its
    own cell, so there are no atomics. Reads grad (contiguous) and x (strided), recomputes the
    residual, writes the contiguous dx.
    """
    p, live, i, j, plane, img = _plane_pixels(C, H, W, sb, sc, BLOCK)  # img: the plane in contiguous grad
    x = tl.load(x_ptr + plane + i * sh + j * sw, mask=live, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + img + p, mask=live, other=0.0).to(tl.float32)
    anchor = tl.load(x_ptr + plane + (i // factor * factor) * sh + (j // factor * factor) * sw,
                     mask=live, other=0.0).to(tl.float32)
    if ABSOLUTE:
        g_self = tl.where(x > anchor, g, tl.where(x < anchor, -g, 0.0))
    else:
        g_self = g
    is_anchor = live & (i % factor == 0) & (j % factor == 0)
    cell_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for di in range(0, factor):
        for dj in range(0, factor):
            qi = i + di
            qj = j + dj
            m = is_anchor & (qi < H) & (qj < W)
            gq = tl.load(grad_ptr + img + qi * W + qj, mask=m, other=0.0).to(tl.float32)
            if ABSOLUTE:
                xq = tl.load(x_ptr + plane + qi * sh + qj * sw, mask=m, other=0.0).to(tl.float32)
                gq = tl.where(xq > x, gq, tl.where(xq < x, -gq, 0.0))
            cell_sum += gq
    tl.store(dx_ptr + img + p, (g_self - cell_sum).to(dx_ptr.dtype.element_ty), mask=live)


_MAX_PLANES = 65535  # grid axis 1 (one program row per (b, c) plane)


def _launch(kernel, x, *tensors_and_out, factor, absolute):
    B, C, H, W = x.shape
    if x.numel():
        config = launch_config("npr_residual", x.device)
        launch(kernel, (cdiv(H * W, config["BLOCK"]), B * C), *tensors_and_out, C, H, W, *x.stride(), factor,
               ABSOLUTE=absolute, **config)


@on_input_device
def _npr_residual(x: torch.Tensor, factor: int, absolute: bool) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(_npr_residual_fwd_kernel, x, x, out, factor=factor, absolute=absolute)
    return out


_npr_residual_op = torch.library.custom_op("lfm::npr_residual", _npr_residual, mutates_args=())


@_npr_residual_op.register_fake
def _(x, factor, absolute):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@on_input_device
def _npr_residual_backward(grad: torch.Tensor, x: torch.Tensor, factor: int, absolute: bool) -> torch.Tensor:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(_npr_residual_bwd_kernel, x, grad.contiguous(), x, dx, factor=factor, absolute=absolute)
    return dx


_npr_residual_backward_op = torch.library.custom_op("lfm::npr_residual_backward", _npr_residual_backward,
                                                    mutates_args=())


@_npr_residual_backward_op.register_fake
def _(grad, x, factor, absolute):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def npr_residual_backward(grad, x, factor, absolute):
    """lfm::npr_residual_backward, called directly in plain eager code (backend.call_op)."""
    return call_op(torch.ops.lfm.npr_residual_backward, _npr_residual_backward, grad, x, factor, absolute)


def _setup_context(ctx, inputs, output):
    x, factor, absolute = inputs
    ctx.save_for_backward(x)
    ctx.factor, ctx.absolute = factor, absolute


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return npr_residual_backward(grad, x, ctx.factor, ctx.absolute), None, None


_npr_residual_autograd = register_autograd(_npr_residual_op, _npr_residual, _backward, _setup_context)


def npr_residual(x: torch.Tensor, factor: int = 2, absolute: bool = True, *, backend=None) -> torch.Tensor:
    """Neighbor-pixel residual of a (B, C, H, W) batch; see the module docstring."""
    check_float_tensor("x", x, 4)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    if resolve_backend(backend, x, "npr_residual", torch.is_grad_enabled() and x.requires_grad) == "torch":
        return npr_residual_reference(x, factor, absolute)
    check_kernel_dtype("x", x)
    B, C, H, W = x.shape
    if B * C > _MAX_PLANES or H * W >= 2**31:
        raise ValueError(f"backend='triton' takes at most {_MAX_PLANES} (batch x channel) planes of fewer than "
                         f"2^31 pixels, got shape {tuple(x.shape)}; use backend='torch'")
    return _npr_residual_autograd(x, factor, bool(absolute))
