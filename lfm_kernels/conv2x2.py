"""The 2x2 convolution as an implicit GEMM on tensor cores: the pieces the SNet kernels share, and
its input- and weight-gradient kernels.

A conv output at pixel (r, c) sums, over the 4 taps (ky, kx) and the input channels, x[r+ky, c+kx]
times the tap's [Cin, Cout] weight slice. The forward kernels run it as a GEMM with M = output pixels
(conv_rows: whole pool windows where the block pools), N = output channels and K = 4 taps x Cin, on
NHWC activations and a packed (4, Cin, Cout) weight (packed_weight), so that every A and B tile is a
set of contiguous vectors (conv_tile). Operands are rounded to the conv's dtype (dot_operand).
Kernels:
  _conv2x2_dx_kernel    d(conv input) from d(conv out): implicit GEMM over Cout x the 4 taps
  _conv2x2_dw_kernel    d(conv weight): split-K GEMM over positions, partials summed in a fixed order
  _sum_partials_kernel  the partials of a split reduction (GEMM epilogues, split-K) summed in a fixed order
"""
import functools
import types

import torch
import triton
import triton.language as tl

from .configs import cdiv, fill_target, halve_to_fill, launch, launch_config, policy_state
from .frozen import preprocessed
from .precision import dot_args, gemm_dot_args


@triton.jit
def input_tile(x_ptr, base, rr, cc, live, ci, ci_live, H, W, sxc, sxh, sxw, NPR: tl.constexpr):
    """[rows, BLOCK_CI] of the block input at pixels (rr, cc); with NPR, |x - x[2*(rr//2), 2*(cc//2)]|."""
    ok = (live & (rr < H) & (cc < W))[:, None] & ci_live[None, :]
    at = x_ptr + base[:, None] + ci[None, :] * sxc
    v = tl.load(at + (rr * sxh + cc * sxw)[:, None], mask=ok, other=0.0)
    if NPR:
        anchor = tl.load(at + ((rr // 2 * 2) * sxh + (cc // 2 * 2) * sxw)[:, None], mask=ok, other=0.0)
        v = tl.abs(v.to(tl.float32) - anchor.to(tl.float32)).to(v.dtype)
    return v


@triton.jit
def dot_operand(v, OPERAND_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """A tile as tl.dot takes it: rounded to the conv's dtype (autocast's under autocast), then in DOT_DTYPE."""
    if OPERAND_DTYPE == tl.bfloat16 and DOT_DTYPE == tl.float32:
        # Only under the interpreter (see backend.dot_args), whose casts to bfloat16 truncate: round to
        # nearest even on the float32 bits instead, as the GPU's conversion does.
        bits = v.to(tl.float32).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    return v.to(OPERAND_DTYPE).to(DOT_DTYPE)


@triton.jit
def conv_rows(n_rows, OH, OW, POOL: tl.constexpr, BLOCK_M: tl.constexpr):
    """The BLOCK_M GEMM rows of program_id(0): the conv pixels (b, r, c) they compute, the output row g
    each belongs to and whether g < n_rows. With POOL the rows are whole 2x2 pool windows: row m is
    position m // (BLOCK_M//4) (row-major in the window) of window g = pid * BLOCK_M//4 + m % (BLOCK_M//4)
    of the (B, OH, OW) window grid, so that pool_windows can take the max in the epilogue; else row m
    is pixel g = pid * BLOCK_M + m of the (B, OH, OW) conv output."""
    m = tl.arange(0, BLOCK_M)
    if POOL:
        g = tl.program_id(0) * (BLOCK_M // 4) + m % (BLOCK_M // 4)
        pos = m // (BLOCK_M // 4)
    else:
        g = tl.program_id(0) * BLOCK_M + m
        pos = m * 0
    gw = g % OW
    gh = (g // OW) % OH
    b = g // (OW * OH)
    if POOL:
        return g, b, gh * 2 + pos // 2, gw * 2 + pos % 2, g < n_rows
    return g, b, gh, gw, g < n_rows


@triton.jit
def tap_columns(BLOCK: tl.constexpr):
    """The 4 * BLOCK columns of one implicit-GEMM K step over the 4 taps of a channel block: each column's tap
    (ky * 2 + kx), ky, kx and channel within the block. One dot per step, over all 4 taps, is what keeps
    sm_90's wgmma in flight (see conv_tile)."""
    k = tl.arange(0, 4 * BLOCK)
    tap = k // BLOCK
    return tap, tap // 2, tap % 2, k % BLOCK


@triton.jit
def conv_tile(x_ptr, w_ptr, b, r, c, live, co, co_live, Cin, H, W, Cout, NPR: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_CO] float32 conv outputs (no bias) at conv pixels (r, c) of images b: an implicit
    GEMM with K = Cin blocks x 4 taps. Each step is one dot over K = 4 taps x BLOCK_CI channels: x is NHWC
    (B, H, W, Cin) contiguous, so the A tile's columns are 4 runs of BLOCK_CI contiguous channels, each at
    its tap's constant shift of the row's pixel (vector loads the pipeliner puts in flight); w is the
    packed (4, Cin, Cout) B operand (packed_weight), whose dtype operands are rounded to. One dot per step,
    its accumulator carried by the loop alone, is what lets sm_90's wgmma run asynchronously (a dot whose
    result feeds another dot of the same step waits for it). With NPR, the A tile is
    |x - x[2*(i//2), 2*(j//2)]|, taken in float32 from x's values and rounded to the operand dtype."""
    image = b.to(tl.int64) * H * W * Cin
    pixel = image + (r * W + c).to(tl.int64) * Cin
    tap, ky, kx, channel = tap_columns(BLOCK_CI)
    shift = (ky * W + kx) * Cin
    operand = w_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_CO], dtype=tl.float32)
    for ci0 in range(0, Cin, BLOCK_CI):
        ci = ci0 + channel
        ci_live = ci < Cin
        ok = live[:, None] & ci_live[None, :]
        a = tl.load(x_ptr + pixel[:, None] + (shift + ci)[None, :], mask=ok, other=0.0)
        if NPR:
            anchor_row = (r[:, None] + ky[None, :]) // 2 * 2
            anchor_col = (c[:, None] + kx[None, :]) // 2 * 2
            anchor = image[:, None] + (anchor_row * W + anchor_col).to(tl.int64) * Cin + ci[None, :]
            a0 = tl.load(x_ptr + anchor, mask=ok, other=0.0)
            a = tl.abs(a.to(tl.float32) - a0.to(tl.float32))
        w = tl.load(w_ptr + (tap * Cin + ci)[:, None] * Cout + co[None, :],
                    mask=ci_live[:, None] & co_live[None, :], other=0.0)
        acc = tl.dot(dot_operand(a, operand, DOT_DTYPE), dot_operand(w, operand, DOT_DTYPE), acc,
                     input_precision=PRECISION)
    return acc


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _conv2x2_dx_kernel(
    dz_ptr, w_ptr, dx_ptr, n_pix, Cin, Cout, H, W, sdb, sdc, sdh, sdw,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """d(conv input) as an implicit GEMM: M = input pixels, N = Cin, K = Cout blocks x 4 taps. Grid:
    (cdiv(B*H*W, BLOCK_P), cdiv(Cin, BLOCK_CI)).

    dx[b, ci, i, j] = sum over taps (ky, kx) and co of dz[b, i-ky, j-kx, co] * weight[co, ci, ky, kx]:
    reads dz (B*(H-1)*(W-1), Cout) in the weight's dtype, whose rows for one tap are a constant shift of the
    pixel's (zero outside the conv map), and the packed (4, Cout, Cin) weight (packed_weight in
    DGRAD_OPERAND order), whose dtype operands are rounded to; writes dx through its strides. Each input pixel
    gathers its own sum: no atomics.
    """
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    live = p < n_pix
    j = p % W
    i = (p // W) % H
    b = p // (W * H)
    ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_live = ci < Cin
    Hc = H - 1
    Wc = W - 1
    # One dot per step over K = 4 taps x BLOCK_CO channels (tap_columns): a column's dz row is the pixel's own
    # conv-map row shifted back by its tap.
    tap, ky, kx, channel = tap_columns(BLOCK_CO)
    r = i[:, None] - ky[None, :]
    c = j[:, None] - kx[None, :]
    inside = live[:, None] & (r >= 0) & (r < Hc) & (c >= 0) & (c < Wc)
    row = ((b.to(tl.int64) * Hc + i) * Wc + j) * Cout
    shift = (ky * Wc + kx) * Cout
    operand = w_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_P, BLOCK_CI], dtype=tl.float32)
    for co0 in range(0, Cout, BLOCK_CO):
        co = co0 + channel
        co_live = co < Cout
        d = tl.load(dz_ptr + row[:, None] + (co - shift)[None, :], mask=inside & co_live[None, :], other=0.0)
        wt = tl.load(w_ptr + (tap * Cout + co)[:, None] * Cin + ci[None, :],
                     mask=co_live[:, None] & ci_live[None, :], other=0.0)
        acc = tl.dot(dot_operand(d, operand, DOT_DTYPE), dot_operand(wt, operand, DOT_DTYPE), acc,
                     input_precision=PRECISION)
    at = (b.to(tl.int64) * sdb + i * sdh + j * sdw)[:, None] + ci[None, :] * sdc
    tl.store(dx_ptr + at, acc.to(dx_ptr.dtype.element_ty), mask=live[:, None] & ci_live[None, :])


@triton.jit
def _conv2x2_dw_kernel(
    dz_ptr, x_ptr, part_ptr, n_pos, per_split, Cin, Cout, H, W, Hc, Wc, sxb, sxc, sxh, sxw,
    NPR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """d(conv weight), split-K over conv positions. Grid: (cdiv(Cout, BLOCK_CO), cdiv(Cin, BLOCK_CI), 4 * splits).

    part[split, tap, co, ci] = sum over conv positions q of this split of dz[q, co] * x[q + tap, ci]
    (x through abs-NPR for the stem). The launcher sums the partials over splits in a fixed order.
    """
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    tap = tl.program_id(2) % 4
    split = tl.program_id(2) // 4
    co_live = co < Cout
    ci_live = ci < Cin
    ky = tap // 2
    kx = tap % 2
    start = split * per_split
    stop = tl.minimum(start + per_split, n_pos)
    acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=tl.float32)
    for q0 in range(start, stop, BLOCK_P):
        q = q0 + tl.arange(0, BLOCK_P)
        live = q < stop
        c = q % Wc
        r = (q // Wc) % Hc
        b = q // (Wc * Hc)
        d = tl.load(dz_ptr + q.to(tl.int64)[:, None] * Cout + co[None, :], mask=live[:, None] & co_live[None, :],
                    other=0.0)
        xt = input_tile(x_ptr, b.to(tl.int64) * sxb, r + ky, c + kx, live, ci, ci_live, H, W, sxc, sxh, sxw, NPR)
        acc = tl.dot(tl.trans(dot_operand(d, OPERAND_DTYPE, DOT_DTYPE)), dot_operand(xt, OPERAND_DTYPE, DOT_DTYPE), acc,
                     input_precision=PRECISION)
    at = ((split * 4 + tap) * Cout + co).to(tl.int64)[:, None] * Cin + ci[None, :]
    tl.store(part_ptr + at, acc, mask=co_live[:, None] & ci_live[None, :])


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, P, N, R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The partials of a split reduction summed in a fixed order. Grid: (cdiv(N, BLOCK_N),).

    out[n, r] = sum over p of part[p, r, n], from the float32 (P, R, N) partials that the programs of a
    GEMM epilogue or the splits of a split-K GEMM wrote: BLOCK_P partials at a time summed as a tree, the
    blocks added in order (deterministic, no atomics); written to the contiguous (N, R) out in its dtype.
    """
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = n < N
    for r in tl.static_range(R):
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            tile = tl.load(part_ptr + (p.to(tl.int64)[:, None] * R + r) * N + n[None, :],
                           mask=(p < P)[:, None] & live[None, :], other=0.0)
            acc += tl.sum(tile, axis=0)
        tl.store(out_ptr + n.to(tl.int64) * R + r, acc.to(out_ptr.dtype.element_ty), mask=live)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def reduction_tiles(kernel: str, block: str, extent: int, device: torch.device):
    """The tiles of a kernel that reduces over partials (BLOCK_P of them a step) with one program per `block`
    of `extent` outputs. Each program reads every partial of its outputs (thousands of rows in training), so
    the block halves, down to 4 outputs, until every SM has a program, and BLOCK_P grows as it narrows (the
    same elements a step). Memoized per signature and launch policy; shared: callers must not modify it."""
    return _reduction_tiles(kernel, block, extent, device, policy_state(device))


@functools.lru_cache(maxsize=1024)
def _reduction_tiles(kernel, block, extent, device, state):
    tiles = launch_config(kernel, device, **{block: extent})
    fitted = tiles[block]
    halve_to_fill(tiles, block, lambda t: cdiv(extent, t[block]), fill_target(device), smallest=4)
    tiles["BLOCK_P"] *= fitted // tiles[block]
    return types.MappingProxyType(tiles)


def sum_partials(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = the sum over p of part[p] in a fixed order (_sum_partials_kernel), one launch for what would be a
    sum, a permutation and a conversion: part is contiguous float32 (P, R, N), out contiguous with N * R
    elements, element (n, r) of the sum at flat position n * R + r."""
    P, R, N = part.shape
    tiles = reduction_tiles("sum_partials", "BLOCK_N", N, part.device)
    if out.numel():
        launch(_sum_partials_kernel, (cdiv(N, tiles["BLOCK_N"]),), part, out, P, N, R=R, **tiles)
    return out


# Memory orders of the GEMM kernels' B operands (packed_weight): the weight's dimensions, outermost first.
CONV_OPERAND = (2, 3, 1, 0)  # a (Cout, Cin, 2, 2) conv weight as (4, Cin, Cout), tap ky*2+kx first
DGRAD_OPERAND = (2, 3, 0, 1)  # as _conv2x2_dx_kernel's (4, Cout, Cin)


def packed_weight(weight: torch.Tensor, dtype: torch.dtype, order=CONV_OPERAND) -> torch.Tensor:
    """A weight as a GEMM kernel's B operand in `dtype`: a tensor of the weight's shape whose memory holds its
    dimensions in `order`, outermost first (its .permute(order) is the operand as a contiguous tensor; the
    kernels read the memory). Packed on every call (once under frozen.frozen_weights): a cache keyed on the
    weight's version would go stale after a `.data` write or a fused optimizer step, which do not count as
    versions."""
    return preprocessed(_pack, weight, dtype, order)


def _pack(weight: torch.Tensor, dtype: torch.dtype, order) -> torch.Tensor:
    """One allocation laid out in `order` and one converting copy: no permuted view to build (each view and
    each conversion costs host time about as much as the allocation)."""
    return torch.empty_permuted(weight.shape, order, dtype=dtype, device=weight.device).copy_(weight)


def launch_conv2x2_dw(dz, x, Cout, npr, compute_dtype, precision, dtype):
    """d(conv weight) (Cout, Cin, 2, 2) in `dtype` from d(conv out) (B*Hc*Wc, Cout): split-K over positions,
    partial sums added in a fixed order (sum_partials)."""
    B, Cin, H, W = x.shape
    Hc, Wc = H - 1, W - 1
    n_pos = B * Hc * Wc
    tiles = launch_config("conv2x2_dw", x.device, compute_dtype, precision, BLOCK_CI=Cin, BLOCK_CO=Cout)
    block_p, max_splits = tiles["BLOCK_P"], tiles.pop("MAX_SPLITS")
    # Splits of at least 8 K steps each, and at most as many programs as two per SM (whole waves at one or two
    # CTAs an SM): each split writes a float32 partial of the whole weight gradient, which sum_partials reads
    # back (block 4 at batch 32, 224x224 on an H100/H200: 8 splits and 17 MB of partials, where splitting by
    # positions alone gave 43-62 splits, 90-130 MB, and 5-8 waves with a partial last one).
    output_tiles = cdiv(Cout, tiles["BLOCK_CO"]) * cdiv(Cin, tiles["BLOCK_CI"]) * 4
    splits = max(1, min(max_splits, cdiv(n_pos, 8 * block_p), 2 * fill_target(x.device) // output_tiles))
    per_split = max(block_p, cdiv(cdiv(n_pos, splits), block_p) * block_p)
    splits = max(1, cdiv(n_pos, per_split))
    part = torch.empty((splits, 4, Cout * Cin), dtype=torch.float32, device=x.device)  # every element written
    launch(_conv2x2_dw_kernel, (cdiv(Cout, tiles["BLOCK_CO"]), cdiv(Cin, tiles["BLOCK_CI"]), 4 * splits),
           dz, x, part, n_pos, per_split, Cin, Cout, H, W, Hc, Wc, *x.stride(), NPR=npr, **tiles,
           **dot_args(compute_dtype, precision))
    return sum_partials(part, torch.empty((Cout, Cin, 2, 2), dtype=dtype, device=x.device))


def launch_conv2x2_dx(dz, x, weight, compute_dtype, precision):
    """d(conv input), x's shape and dtype, channels_last, from d(conv out) (B*Hc*Wc, Cout)."""
    B, Cin, H, W = x.shape
    Cout = weight.shape[0]
    tiles = launch_config("conv2x2_dx", x.device, compute_dtype, precision, BLOCK_CI=Cin, BLOCK_CO=Cout)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if dx.numel():
        launch(_conv2x2_dx_kernel, (cdiv(B * H * W, tiles["BLOCK_P"]), cdiv(Cin, tiles["BLOCK_CI"])),
               dz, packed_weight(weight, compute_dtype, DGRAD_OPERAND), dx, B * H * W, Cin, Cout, H, W, *dx.stride(),
               **tiles, **gemm_dot_args(compute_dtype, precision))
    return dx
