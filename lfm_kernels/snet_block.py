"""SNet block fused: [abs-NPR residual ->] 2x2 conv -> BatchNorm -> ReLU [-> 2x2 max-pool].

snet_block(x, ...) == maxpool2x2(relu(batchnorm(conv2d_2x2(abs_npr(x) if npr else x)))) with nn.BatchNorm2d
semantics. Activations between blocks are NHWC (channels_last); the conv is conv2x2.py's implicit GEMM with M
= output pixels laid out as whole pool windows, so BatchNorm (a per-channel scale and shift computed in the
kernel from the conv bias, gamma, beta, mean and variance: no folded weight copy that an update could leave
stale), ReLU and the pool happen in the epilogue and only the pooled map is written. The stem (npr: the
image's residual, 3 channels, K = 12) is memory-bound: it runs as plain float32 FMAs, as cuDNN does, in every
precision mode. Training computes each conv once in the forward: a GEMM whose epilogue stores the conv (in the
compute dtype, as cuDNN would) and per-program partial count, mean and M2 (merged in a fixed order:
deterministic, no atomics), then a memory-bound pass that normalizes, ReLUs and pools it and saves the window
argmax (uint8). Only the block input, the statistics, the argmax and the packed weight are kept for the
backward, so activation memory stays a third of eager's; the backward computes the conv once more (a GEMM
whose epilogue stores it with per-program sums of dy and dy * zhat), turns it into d(conv out) in place in a
memory-bound pass, then runs conv2x2.py's input and weight gradients. Per-program partials are merged by
kernels too (conv2x2.sum_partials), not by chains of torch reductions: on a GPU each torch op is a launch. The
stem keeps a statistics pass and the fused normalize kernel: its conv (K = 12) costs less to compute twice
than its 64-channel map costs to store and read. ReLU and max-pool propagate NaN as PyTorch does.
Kernels:
  _snet_block_kernel          conv (GEMM) + BatchNorm + ReLU [+ pool, argmax]: inference, fixed statistics
  _snet_stem_kernel           the same for the stem: abs-NPR + conv as float32 FMAs
  _snet_block_stats_kernel    training: the conv [stored] with per-program count, mean and M2 of conv + bias
  _merge_batch_stats_kernel   training: those partials merged in a fixed order into the batch statistics
  _snet_block_apply_kernel    training: BatchNorm + ReLU [+ pool, argmax] of the stored conv
  _snet_block_dy_sums_kernel  backward: the conv stored, with per-program sums of dy and dy * zhat
  _snet_block_dz_kernel       backward: d(conv out) in place from the stored conv and those sums' means
  _snet_stem_wgrad_kernel     the stem's backward: conv, d(conv out) and the weight gradient in one pass
"""
import functools
import types

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .backend import call_op, on_input_device, register_autograd, resolve_backend
from .checks import check_float_tensor, check_same_device, flag_signature, once_per_signature, tensors_signature
from .configs import cdiv, fill_target, halve_to_fill, launch, launch_config, policy_state
from .conv2x2 import (
    CONV_OPERAND,
    conv_rows,
    conv_tile,
    dot_operand,
    launch_conv2x2_dw,
    launch_conv2x2_dx,
    packed_weight,
    reduction_tiles,
    sum_partials,
)
from .npr_residual import npr_residual_backward, npr_residual_reference
from .precision import (
    autocast_enabled,
    check_conv_dtypes,
    check_precision,
    conv_input,
    dot_args,
    gemm_dot_args,
    resolve_precision,
)
from .snet_block_torch import (
    bessel_correction,
    fast_training,
    snet_block_inference,
    snet_block_train,
    update_running_stats,
)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def snet_block_reference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, *, eps=1e-5,
                         momentum=0.1, training=False, pool=True, npr=False):
    if npr:
        x = npr_residual_reference(x, 2, True)
    y = F.conv2d(x, conv_weight, conv_bias)
    y = F.relu(F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    return F.max_pool2d(y, 2) if pool else y


# ---------------------------------------------------------------------------------------------
# Triton helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def relu(v):
    """max(v, 0) with NaN kept, as torch.relu (tl.maximum alone returns the non-NaN operand)."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def batchnorm_vectors(bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, co, co_live):
    """The conv bias, gamma, beta, mean and variance at channels co as float32 [BLOCK_CO] vectors (a dead
    channel's variance 1, so that no lane divides by zero)."""
    bias = tl.load(bias_ptr + co, mask=co_live, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + co, mask=co_live, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + co, mask=co_live, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + co, mask=co_live, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + co, mask=co_live, other=1.0).to(tl.float32)
    return bias, gamma, beta, mean, var


@triton.jit
def batchnorm_affine(bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, co, co_live):
    """[1, BLOCK_CO] scale and shift with conv(x) * scale + shift == batchnorm(conv(x) + bias), from Cout
    values of each vector (float32, correctly rounded)."""
    bias, gamma, beta, mean, var = batchnorm_vectors(bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, co, co_live)
    scale = tl.div_rn(gamma, tl.sqrt_rn(var + eps))
    return scale[None, :], ((bias - mean) * scale + beta)[None, :]


@triton.jit
def _max_first(best, arg, y, pos):
    """The running window max and argmax with y at window position pos: first max wins, a NaN always
    (as max_pool2d)."""
    return tl.maximum(best, y, propagate_nan=tl.PropagateNan.ALL), tl.where((y > best) | (y != y), pos, arg)


@triton.jit
def _store_normalized(y, g, live, n_rows, co, co_live, out_ptr, argmax_ptr, Cout, POOL: tl.constexpr,
                      SAVE_ARGMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr):
    """The epilogue of both normalize kernels: y [BLOCK_M, BLOCK_CO] (rows as conv_rows lays them out),
    rounded to out's dtype (max-pooling rounded values gives the rounded max), pooled over each window's
    4 rows with POOL; stored to the NHWC output (and the uint8 argmax with SAVE_ARGMAX) at output row g."""
    y = y.to(out_ptr.dtype.element_ty)
    if POOL:
        # [4 positions x BLOCK_M//4 windows] rows -> four [windows, BLOCK_CO] tiles, one per position.
        by_position = tl.permute(tl.reshape(y, (2, 2, BLOCK_M // 4, BLOCK_CO)), (2, 3, 0, 1))
        left, right = tl.split(by_position)
        y0, y2 = tl.split(left)
        y1, y3 = tl.split(right)
        best, arg = _max_first(y0, tl.zeros([BLOCK_M // 4, BLOCK_CO], dtype=tl.int32), y1, 1)
        best, arg = _max_first(best, arg, y2, 2)
        best, arg = _max_first(best, arg, y3, 3)
        g = tl.program_id(0) * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)  # the windows, once each
        live = g < n_rows
        y = best
    at = g.to(tl.int64)[:, None] * Cout + co[None, :]
    ok = live[:, None] & co_live[None, :]
    tl.store(out_ptr + at, y, mask=ok)
    if SAVE_ARGMAX:
        tl.store(argmax_ptr + at, arg.to(tl.uint8), mask=ok)


@triton.jit
def stem_tap(x_ptr, b, ci, r, c, tap: tl.constexpr, live, Cin, H, W, OPERAND_DTYPE: tl.constexpr):
    """[rows] |NPR residual| of image channel ci at conv tap `tap` (ky * 2 + kx) of pixels (r, c) of images b,
    from the contiguous (B, Cin, H, W) image, in float32 rounded to OPERAND_DTYPE (the stem's operand)."""
    plane = x_ptr + (b.to(tl.int64) * Cin + ci) * H * W
    rr = r + tap // 2
    cc = c + tap % 2
    v = tl.load(plane + rr * W + cc, mask=live, other=0.0).to(tl.float32)
    v = tl.abs(v - tl.load(plane + (rr // 2 * 2) * W + cc // 2 * 2, mask=live, other=0.0).to(tl.float32))
    return dot_operand(v, OPERAND_DTYPE, tl.float32)


@triton.jit
def stem_conv(x_ptr, w_ptr, b, r, c, live, co, co_live, Cin, H, W, OPERAND_DTYPE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr):
    """[BLOCK_M, BLOCK_CO] stem conv (no bias) of the image's residual: Cin x 4 float32 FMAs per output (K = 12
    leaves tensor cores idle), weight (Cout, Cin, 2, 2) contiguous, rounded to OPERAND_DTYPE."""
    acc = tl.zeros([BLOCK_M, BLOCK_CO], dtype=tl.float32)
    for ci in range(0, Cin):
        for tap in tl.static_range(4):
            w = tl.load(w_ptr + (co * Cin + ci) * 4 + tap, mask=co_live, other=0.0)
            v = stem_tap(x_ptr, b, ci, r, c, tap, live, Cin, H, W, OPERAND_DTYPE)
            acc += v[:, None] * dot_operand(w, OPERAND_DTYPE, tl.float32)[None, :]
    return acc


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _snet_block_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr, argmax_ptr, eps,
    n_rows, H, W, OH, OW, Cin, Cout,
    POOL: tl.constexpr, SAVE_ARGMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Conv + BatchNorm (given mean and var) + ReLU [+ 2x2 max-pool]. Grid: (cdiv(n_rows, BLOCK_M // 4 if POOL
    else BLOCK_M), cdiv(Cout, BLOCK_CO)).

    Reads the NHWC block input x (B, H, W, Cin) and the packed weight; one [BLOCK_M, BLOCK_CO] accumulator
    over K = Cin x 4 taps (conv_tile); writes the NHWC output (B, OH, OW, Cout): pooled windows (OH x OW
    = floor of the conv map's half) with POOL, else the conv map, and with SAVE_ARGMAX the uint8 window
    argmax (0..3) in the same layout.
    """
    g, b, r, c, live = conv_rows(n_rows, OH, OW, POOL, BLOCK_M)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_live = co < Cout
    acc = conv_tile(x_ptr, w_ptr, b, r, c, live, co, co_live, Cin, H, W, Cout, False, BLOCK_M, BLOCK_CI, BLOCK_CO,
                    DOT_DTYPE, PRECISION)
    scale, shift = batchnorm_affine(bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, co, co_live)
    _store_normalized(relu(acc * scale + shift), g, live, n_rows, co, co_live, out_ptr, argmax_ptr, Cout, POOL,
                      SAVE_ARGMAX, BLOCK_M, BLOCK_CO)


@triton.jit
def _snet_stem_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr, argmax_ptr, eps,
    n_rows, H, W, OH, OW, Cin, Cout,
    POOL: tl.constexpr, SAVE_ARGMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
):
    """The stem: |NPR residual| of the image + conv + BatchNorm + ReLU [+ pool]. Grid: as _snet_block_kernel's.

    Reads the image x (B, Cin, H, W) contiguous and the (Cout, Cin, 2, 2) weight; the conv's Cin x 4
    products per output are float32 FMAs on operands rounded to OPERAND_DTYPE (K = 12 leaves tensor
    cores idle; the kernel is bound by its output bytes). Writes as _snet_block_kernel.
    """
    g, b, r, c, live = conv_rows(n_rows, OH, OW, POOL, BLOCK_M)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_live = co < Cout
    acc = stem_conv(x_ptr, w_ptr, b, r, c, live, co, co_live, Cin, H, W, OPERAND_DTYPE, BLOCK_M, BLOCK_CO)
    scale, shift = batchnorm_affine(bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, co, co_live)
    _store_normalized(relu(acc * scale + shift), g, live, n_rows, co, co_live, out_ptr, argmax_ptr, Cout, POOL,
                      SAVE_ARGMAX, BLOCK_M, BLOCK_CO)


@triton.jit
def _snet_block_stats_kernel(
    x_ptr, w_ptr, bias_ptr, z_ptr, part_count_ptr, part_mean_ptr, part_m2_ptr, n_rows, H, W, OH, OW, Cin, Cout,
    NPR: tl.constexpr, STORE_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """The conv once, with batch statistics in the epilogue. Grid: (cdiv(n_rows, BLOCK_M), cdiv(Cout, BLOCK_CO)).

    Computes the conv at BLOCK_M pixels of the (B, OH, OW) conv map from the NHWC input; with STORE_Z writes
    it (no bias, rounded to z's dtype, as a cuDNN conv in that dtype would) to z (B*OH*OW, Cout) for
    _snet_block_apply_kernel. Writes this program's pixel count, and per channel the mean and M2 of
    conv + bias over its pixels (of the stored values with STORE_Z), to part_count[pid], part_mean[pid, :],
    part_m2[pid, :] (merged in a fixed order by _merge_batch_stats_kernel).
    """
    g, b, r, c, live = conv_rows(n_rows, OH, OW, False, BLOCK_M)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_live = co < Cout
    a = conv_tile(x_ptr, w_ptr, b, r, c, live, co, co_live, Cin, H, W, Cout, NPR, BLOCK_M, BLOCK_CI, BLOCK_CO,
                  DOT_DTYPE, PRECISION)
    if STORE_Z:
        a = a.to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + g.to(tl.int64)[:, None] * Cout + co[None, :], a, mask=live[:, None] & co_live[None, :])
        a = a.to(tl.float32)
    a += tl.load(bias_ptr + co, mask=co_live, other=0.0).to(tl.float32)[None, :]
    n = tl.sum(live.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(live[:, None], a, 0.0), axis=0) / tl.maximum(n, 1.0)
    d = a - mean[None, :]
    pid = tl.program_id(0)
    tl.store(part_count_ptr + pid, n)
    tl.store(part_mean_ptr + pid * Cout + co, mean, mask=co_live)
    tl.store(part_m2_ptr + pid * Cout + co, tl.sum(tl.where(live[:, None], d * d, 0.0), axis=0), mask=co_live)


@triton.jit
def _merge_batch_stats_kernel(part_count_ptr, part_mean_ptr, part_m2_ptr, mean_ptr, var_ptr, target_ptr, unbias, P,
                              Cout, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The batch statistics from _snet_block_stats_kernel's partials. Grid: (cdiv(Cout, BLOCK_C),).

    Merges the P programs' (count, mean, M2) with Chan's formula, BLOCK_P partials at a time as a tree and the
    blocks in order (deterministic): the mean, then M2 = sum of M2 + count * (mean_p - mean)^2. Writes the
    float32 mean and biased variance (M2 / count) of each channel (zeros for an empty batch), and the targets
    of the running statistics' update in their dtype (running_stats_targets): the mean and the variance times
    unbias (bessel_correction), so that the update is one launch.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = c < Cout
    n = 0.0
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        count = tl.load(part_count_ptr + p, mask=p < P, other=0.0)
        mean = tl.load(part_mean_ptr + p.to(tl.int64)[:, None] * Cout + c[None, :],
                       mask=(p < P)[:, None] & live[None, :], other=0.0)
        n += tl.sum(count, axis=0)
        total += tl.sum(count[:, None] * mean, axis=0)
    n = tl.maximum(n, 1.0)  # an empty batch (no programs): zeros, which nothing reads
    mu = total / n
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & live[None, :]
        count = tl.load(part_count_ptr + p, mask=p < P, other=0.0)
        at = p.to(tl.int64)[:, None] * Cout + c[None, :]
        d = tl.load(part_mean_ptr + at, mask=ok, other=0.0) - mu[None, :]
        m2 += tl.sum(tl.load(part_m2_ptr + at, mask=ok, other=0.0) + count[:, None] * d * d, axis=0)
    var = m2 / n
    tl.store(mean_ptr + c, mu, mask=live)
    tl.store(var_ptr + c, var, mask=live)
    tl.store(target_ptr + c, mu, mask=live)
    tl.store(target_ptr + Cout + c, var * unbias, mask=live)


@triton.jit
def _snet_block_apply_kernel(
    z_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr, argmax_ptr, eps, n_rows, Hc, Wc, OH, OW, Cout,
    POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """BatchNorm + ReLU [+ 2x2 max-pool, argmax] of a stored conv: memory-bound. Grid: as _snet_block_kernel's.

    Reads z (B*Hc*Wc, Cout), the conv without bias that _snet_block_stats_kernel stored, at the BLOCK_M
    pixels conv_rows gives (whole pool windows with POOL); writes as _snet_block_kernel, argmax included.
    """
    g, b, r, c, live = conv_rows(n_rows, OH, OW, POOL, BLOCK_M)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_live = co < Cout
    at = ((b.to(tl.int64) * Hc + r) * Wc + c)[:, None] * Cout + co[None, :]
    acc = tl.load(z_ptr + at, mask=live[:, None] & co_live[None, :], other=0.0).to(tl.float32)
    scale, shift = batchnorm_affine(bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, co, co_live)
    _store_normalized(relu(acc * scale + shift), g, live, n_rows, co, co_live, out_ptr, argmax_ptr, Cout, POOL,
                      POOL, BLOCK_M, BLOCK_CO)


@triton.jit
def _backward_rows(n_rows, H, W, OH, OW, Cout, POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr):
    """The backward passes' rows: BLOCK_M conv pixels (whole windows of the (OH, OW) grid that covers the
    conv map with POOL), their offsets in the (B*(H-1)*(W-1), Cout) conv map, whether each is a pixel of
    the map, and the output channels with their liveness."""
    _, b, r, c, live = conv_rows(n_rows, OH, OW, POOL, BLOCK_M)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    valid = live & (r < H - 1) & (c < W - 1)
    pixel = ((b.to(tl.int64) * (H - 1) + r) * (W - 1) + c) * Cout
    return b, r, c, valid, pixel, co, co < Cout


@triton.jit
def _block_dy(a, b, r, c, valid, pixel, co, co_live, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, grad_ptr,
              argmax_ptr, H, W, Cout, POOL: tl.constexpr, BLOCK_M: tl.constexpr):
    """From the conv output a (no bias) at _backward_rows' pixels: the normalized zhat, the gradient dy at
    the BatchNorm output (the output gradient routed through the saved argmax and the ReLU) and
    gamma * rstd, from the conv bias, gamma, beta and the statistics the forward used (float32; rstd as
    1 / sqrt(var + eps), each operation correctly rounded)."""
    bias, gamma, beta, mean, var = batchnorm_vectors(bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, co, co_live)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    zhat = (a + bias[None, :] - mean[None, :]) * rstd[None, :]
    if POOL:  # the window's gradient goes to its argmax position; windows past the floor of the half get none
        m = tl.arange(0, BLOCK_M)
        Hp = (H - 1) // 2
        Wp = (W - 1) // 2
        win = (b.to(tl.int64) * Hp + r // 2) * Wp + c // 2
        pooled = (valid & (r // 2 < Hp) & (c // 2 < Wp))[:, None] & co_live[None, :]
        at = win[:, None] * Cout + co[None, :]
        arg = tl.load(argmax_ptr + at, mask=pooled, other=4).to(tl.int32)
        da = tl.load(grad_ptr + at, mask=pooled & (arg == (m // (BLOCK_M // 4))[:, None]), other=0.0)
    else:
        da = tl.load(grad_ptr + pixel[:, None] + co[None, :], mask=valid[:, None] & co_live[None, :], other=0.0)
    dy = tl.where(valid[:, None] & (zhat * gamma[None, :] + beta[None, :] > 0), da.to(tl.float32), 0.0)
    return zhat, dy, (gamma * rstd)[None, :]


@triton.jit
def _conv_out_grad(a, b, r, c, valid, pixel, co, co_live, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps,
                   grad_ptr, argmax_ptr, sums_ptr, n_stats, dbias_ptr, H, W, Cout, POOL: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """d(conv out) = gamma * rstd * (dy - mean(dy) - zhat * mean(dy * zhat)) from the conv output a at
    _backward_rows' pixels (zero off the map); the means are the float32 (2 * Cout) sums of dy, then dy * zhat,
    over the n_stats values of the batch statistics (zeros with n_stats = 0: statistics not the batch's). Stores
    this program's float32 per-channel sum of it, the conv bias's gradient, to dbias[pid, :]."""
    zhat, dy, k = _block_dy(a, b, r, c, valid, pixel, co, co_live, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
                            eps, grad_ptr, argmax_ptr, H, W, Cout, POOL, BLOCK_M)
    count = tl.maximum(n_stats, 1.0)
    c1 = tl.where(n_stats > 0, tl.load(sums_ptr + co, mask=co_live, other=0.0) / count, 0.0)[None, :]
    c2 = tl.where(n_stats > 0, tl.load(sums_ptr + Cout + co, mask=co_live, other=0.0) / count, 0.0)[None, :]
    dz = tl.where(valid[:, None] & co_live[None, :], k * (dy - c1 - zhat * c2), 0.0)
    tl.store(dbias_ptr + tl.program_id(0) * Cout + co, tl.sum(dz, axis=0), mask=co_live)
    return dz


@triton.jit
def _snet_block_dy_sums_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, grad_ptr, argmax_ptr, sums_ptr, z_ptr,
    n_rows, H, W, OH, OW, Cin, Cout,
    POOL: tl.constexpr, NPR: tl.constexpr, STORE_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward, pass 1: the conv recomputed once. Grid: (cdiv(n_rows, BLOCK_M // 4 if POOL else BLOCK_M),
    cdiv(Cout, BLOCK_CO)).

    Reads the NHWC block input, the packed weight, the output gradient and the window argmax; with STORE_Z
    writes the conv output (no bias, rounded to z's dtype, the compute dtype, as the forward stored it) to z
    (B*(H-1)*(W-1), Cout) for pass 2, and this program's per-channel sums of dy and dy * zhat to
    sums[pid, 0:Cout] and sums[pid, Cout:2*Cout] of the (programs, 2 * Cout) float32 buffer (one sum_partials
    adds up both).
    """
    b, r, c, valid, pixel, co, co_live = _backward_rows(n_rows, H, W, OH, OW, Cout, POOL, BLOCK_M, BLOCK_CO)
    a = conv_tile(x_ptr, w_ptr, b, r, c, valid, co, co_live, Cin, H, W, Cout, NPR, BLOCK_M, BLOCK_CI, BLOCK_CO,
                  DOT_DTYPE, PRECISION)
    if STORE_Z:
        a = a.to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + pixel[:, None] + co[None, :], a, mask=valid[:, None] & co_live[None, :])
        a = a.to(tl.float32)
    zhat, dy, _ = _block_dy(a, b, r, c, valid, pixel, co, co_live, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
                            eps, grad_ptr, argmax_ptr, H, W, Cout, POOL, BLOCK_M)
    at = tl.program_id(0) * 2 * Cout + co
    tl.store(sums_ptr + at, tl.sum(dy, axis=0), mask=co_live)
    tl.store(sums_ptr + Cout + at, tl.sum(dy * zhat, axis=0), mask=co_live)


@triton.jit
def _snet_block_dz_kernel(
    z_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, grad_ptr, argmax_ptr, sums_ptr, n_stats,
    dbias_ptr, n_rows, H, W, OH, OW, Cout,
    POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """Backward, pass 2, memory-bound. Grid: (cdiv(n_rows, BLOCK_M // 4 if POOL else BLOCK_M), cdiv(Cout, BLOCK_CO)).

    Reads pass 1's conv output z, the output gradient and the argmax; overwrites z in place with d(conv out)
    (_conv_out_grad) in z's dtype (what the gradient GEMMs round their operand to) and writes this program's
    conv-bias partial to dbias[pid, :]. Each program reads and writes only its own pixels.
    """
    b, r, c, valid, pixel, co, co_live = _backward_rows(n_rows, H, W, OH, OW, Cout, POOL, BLOCK_M, BLOCK_CO)
    at = z_ptr + pixel[:, None] + co[None, :]
    ok = valid[:, None] & co_live[None, :]
    a = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    dz = _conv_out_grad(a, b, r, c, valid, pixel, co, co_live, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps,
                        grad_ptr, argmax_ptr, sums_ptr, n_stats, dbias_ptr, H, W, Cout, POOL, BLOCK_M)
    tl.store(at, dz.to(z_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _snet_stem_wgrad_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, grad_ptr, argmax_ptr, sums_ptr, n_stats,
    part_ptr, dbias_ptr, n_rows, H, W, OH, OW, Cin, Cout,
    POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, OPERAND_DTYPE: tl.constexpr,
):
    """The stem's backward pass 2 without d(conv out) in memory. Grid: (cdiv(n_rows, BLOCK_M // 4 if POOL else
    BLOCK_M), cdiv(Cout, BLOCK_CO)).

    Recomputes the stem's conv (stem_conv) at its pixels from the contiguous image and weight, turns it into
    d(conv out) as _snet_block_dz_kernel does, and reduces it against each of the Cin x 4 residual taps:
    writes this program's weight-gradient partial part[pid, tap, co, ci] ((programs, 4, Cout, Cin) float32)
    and conv-bias partial dbias[pid, co], summed in a fixed order (sum_partials). The (B*(H-1)*(W-1), Cout)
    gradient map that the general path writes and reads back never exists.
    """
    b, r, c, valid, pixel, co, co_live = _backward_rows(n_rows, H, W, OH, OW, Cout, POOL, BLOCK_M, BLOCK_CO)
    a = stem_conv(x_ptr, w_ptr, b, r, c, valid, co, co_live, Cin, H, W, OPERAND_DTYPE, BLOCK_M, BLOCK_CO)
    dz = _conv_out_grad(a, b, r, c, valid, pixel, co, co_live, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps,
                        grad_ptr, argmax_ptr, sums_ptr, n_stats, dbias_ptr, H, W, Cout, POOL, BLOCK_M)
    pid = tl.program_id(0)
    dz = dot_operand(dz, OPERAND_DTYPE, tl.float32)  # as the weight-gradient GEMM rounds its operands
    for ci in range(0, Cin):
        for tap in tl.static_range(4):
            v = stem_tap(x_ptr, b, ci, r, c, tap, valid, Cin, H, W, OPERAND_DTYPE)
            tl.store(part_ptr + ((pid * 4 + tap) * Cout + co).to(tl.int64) * Cin + ci, tl.sum(dz * v[:, None], axis=0),
                     mask=co_live)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def nhwc(x: torch.Tensor) -> torch.Tensor:
    """x as the GEMM kernels read it: channels_last and dense (a no-op between blocks)."""
    return x.contiguous(memory_format=torch.channels_last)


def _grid(kernel, x, w, n_rows, pool, compute_dtype, precision, **extents):
    """(constexprs, grid) of a block launch over n_rows output rows (windows with pool, else pixels)."""
    return _grid_plan(kernel, n_rows, w.shape[0], pool, compute_dtype, precision, x.device, policy_state(x.device),
                      tuple(sorted(extents.items())))


@functools.lru_cache(maxsize=1024)
def _grid_plan(kernel, n_rows, Cout, pool, compute_dtype, precision, device, state, extents):
    """_grid memoized per signature and configs.policy_state (launchers run on every forward): channel blocks
    narrow at small batch until every SM has a program. Shared: callers must not modify the constexprs."""
    tiles = launch_config(kernel, device, compute_dtype, precision, BLOCK_CO=Cout, **dict(extents))

    def grid(t):
        return cdiv(n_rows, t["BLOCK_M"] // 4 if pool else t["BLOCK_M"]), cdiv(Cout, t["BLOCK_CO"])

    halve_to_fill(tiles, "BLOCK_CO", lambda t: grid(t)[0] * grid(t)[1], fill_target(device))
    return types.MappingProxyType(tiles), grid(tiles)


def _launch_normalize(x, w, w_packed, bias, gamma, beta, mean, var, eps, *, pool, npr, precision, compute_dtype,
                      save_argmax=False, z=None):
    """relu(batchnorm(conv)) [pooled] with the given statistics: (NHWC out, window argmax or None), w_packed
    being packed_weight(w) (None for the stem, which reads w). Given z, the conv that _batch_stats stored
    (training), it reads that instead of computing the conv again."""
    B, Cin, H, W = x.shape
    Cout, Hc, Wc = w.shape[0], H - 1, W - 1
    OH, OW = (Hc // 2, Wc // 2) if pool else (Hc, Wc)
    out = torch.empty((B, Cout, OH, OW), dtype=compute_dtype, device=x.device, memory_format=torch.channels_last)
    argmax = torch.empty_like(out, dtype=torch.uint8) if pool and save_argmax else None
    n_rows = B * OH * OW
    if not n_rows:
        return out, argmax
    flags = dict(POOL=pool, SAVE_ARGMAX=argmax is not None)
    if z is not None:
        tiles, grid = _grid("snet_block_apply", x, w, n_rows, pool, compute_dtype, precision)
        launch(_snet_block_apply_kernel, grid, z, bias, gamma, beta, mean, var, out,
               argmax if argmax is not None else out, eps, n_rows, Hc, Wc, OH, OW, Cout, POOL=pool, **tiles)
    elif npr:
        tiles, grid = _grid("snet_stem", x, w, n_rows, pool, compute_dtype, precision)
        launch(_snet_stem_kernel, grid, x.contiguous(), w.contiguous(), bias, gamma, beta, mean, var, out,
               argmax if argmax is not None else out, eps, n_rows, H, W, OH, OW, Cin, Cout, **flags, **tiles,
               OPERAND_DTYPE=dot_args(compute_dtype, precision)["OPERAND_DTYPE"])
    else:
        tiles, grid = _grid("snet_block", x, w, n_rows, pool, compute_dtype, precision, BLOCK_CI=Cin)
        launch(_snet_block_kernel, grid, nhwc(x), w_packed, bias, gamma, beta, mean, var, out,
               argmax if argmax is not None else out, eps, n_rows, H, W, OH, OW, Cin, Cout, **flags, **tiles,
               **gemm_dot_args(compute_dtype, precision))
    return out, argmax


def _batch_stats(x, w_packed, bias, npr, precision, compute_dtype, running_dtype):
    """(mean, biased variance, running_stats_targets in running_dtype, z) of conv(x) + bias per channel, merged
    from per-program (count, mean, M2) with Chan's formula in a fixed order (_merge_batch_stats_kernel). z is
    the conv (no bias, compute_dtype, (B*(H-1)*(W-1), Cout)) for _launch_normalize; None for the stem, whose
    conv (K = 12) costs less to compute again than its 64-channel map costs to store and read."""
    B, Cin, H, W = x.shape
    Cout, Hc, Wc = w_packed.shape[0], H - 1, W - 1
    n_rows = B * Hc * Wc
    tiles, grid = _grid("snet_block_stats", x, w_packed, n_rows, False, compute_dtype, precision, BLOCK_CI=Cin)
    # Every program writes its partials: no zero fill.
    count = torch.empty(grid[0], dtype=torch.float32, device=x.device)
    mean, m2 = torch.empty((2, grid[0], Cout), dtype=torch.float32, device=x.device)
    z = None if npr else torch.empty((n_rows, Cout), dtype=compute_dtype, device=x.device)
    if n_rows:
        launch(_snet_block_stats_kernel, grid, nhwc(x), w_packed, bias,
               mean if z is None else z, count, mean, m2, n_rows, H, W, Hc, Wc, Cin, Cout, NPR=npr,
               STORE_Z=z is not None, **tiles, **gemm_dot_args(compute_dtype, precision))
    mu, var = (torch.empty(Cout, dtype=torch.float32, device=x.device) for _ in range(2))  # outputs: no aliasing
    targets = torch.empty((2, Cout), dtype=running_dtype, device=x.device)
    merge = reduction_tiles("merge_batch_stats", "BLOCK_C", Cout, x.device)
    launch(_merge_batch_stats_kernel, (cdiv(Cout, merge["BLOCK_C"]),), count, mean, m2, mu, var, targets,
           bessel_correction(n_rows), grid[0], Cout, **merge)
    return mu, var, targets, z


def block_precision(npr: bool, precision: str) -> str:
    """The stem computes in full float32 (memory-bound: TF32 would cost accuracy and gain nothing)."""
    return "ieee" if npr else precision


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------
def _out_shape(x, w, pool):
    B, _, H, W = x.shape
    Hc, Wc = H - 1, W - 1
    return (B, w.shape[0], Hc // 2, Wc // 2) if pool else (B, w.shape[0], Hc, Wc)


def _fake_out(x, w, pool, dtype):
    return torch.empty(_out_shape(x, w, pool), dtype=dtype, device=x.device, memory_format=torch.channels_last)


@on_input_device
def _snet_block_eval(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                     beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float, pool: bool, npr: bool,
                     precision: str, compute_dtype: torch.dtype) -> torch.Tensor:
    """Inference with the running statistics: one launch, BatchNorm applied in the kernel."""
    w_packed = None if npr else packed_weight(weight, compute_dtype)
    return _launch_normalize(x, weight, w_packed, bias, gamma, beta, mean, var, eps, pool=pool, npr=npr,
                             precision=block_precision(npr, precision), compute_dtype=compute_dtype)[0]


_snet_block_eval_op = torch.library.custom_op("lfm::snet_block_eval", _snet_block_eval, mutates_args=())


@_snet_block_eval_op.register_fake
def _(x, weight, bias, gamma, beta, mean, var, eps, pool, npr, precision, compute_dtype):
    return _fake_out(x, weight, pool, compute_dtype)


@on_input_device
def _snet_block_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                      beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float, batch_stats: bool,
                      pool: bool, npr: bool, precision: str, compute_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward with BatchNorm statistics of the batch (batch_stats) or the given mean/var; returns
    (out, window argmax or an empty tensor, mean used, biased variance used, with batch_stats the running
    statistics' targets (running_stats_targets, in mean's dtype) else an empty tensor, and the packed weight,
    which the backward reuses)."""
    precision = block_precision(npr, precision)
    w_packed = packed_weight(weight, compute_dtype)
    z = None
    if batch_stats:
        mean_used, var_used, targets, z = _batch_stats(x, w_packed, bias, npr, precision, compute_dtype, mean.dtype)
    else:
        mean_used, var_used, targets = mean.float().clone(), var.float().clone(), mean.new_empty(0)
    out, argmax = _launch_normalize(x, weight, w_packed, bias, gamma, beta, mean_used, var_used, eps, pool=pool,
                                    npr=npr, precision=precision, compute_dtype=compute_dtype, save_argmax=True, z=z)
    if argmax is None:
        argmax = torch.empty(0, dtype=torch.uint8, device=x.device)
    return out, argmax, mean_used, var_used, targets, w_packed


_snet_block_train_op = torch.library.custom_op("lfm::snet_block_train", _snet_block_train, mutates_args=())


@_snet_block_train_op.register_fake
def _(x, weight, bias, gamma, beta, mean, var, eps, batch_stats, pool, npr, precision, compute_dtype):
    argmax = _fake_out(x, weight, pool, torch.uint8) if pool else x.new_empty(0, dtype=torch.uint8)
    stats = x.new_empty(weight.shape[0], dtype=torch.float32)
    targets = mean.new_empty((2, weight.shape[0]) if batch_stats else (0,))
    w_packed = torch.empty_permuted(weight.shape, CONV_OPERAND, dtype=compute_dtype, device=weight.device)
    return _fake_out(x, weight, pool, compute_dtype), argmax, stats, torch.empty_like(stats), targets, w_packed


@on_input_device
def _snet_block_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, w_packed: torch.Tensor,
                         bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor,
                         var: torch.Tensor, argmax: torch.Tensor, eps: float, batch_stats: bool, pool: bool, npr: bool,
                         precision: str, compute_dtype: torch.dtype, need_dx: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx or an empty tensor, dweight, dbias, (dbeta, dgamma) as one (2, Cout) tensor in gamma's
    dtype), w_packed being the forward's packed weight: the conv once more with the sums
    BatchNorm's backward needs, a memory-bound pass through pool, ReLU and BatchNorm to d(conv out), then
    its weight and input gradients. The stem without dx computes its conv a third time instead (K = 12)
    and makes the weight gradient in the same pass: its 64-channel d(conv out) is never stored."""
    precision = block_precision(npr, precision)
    B, Cin, H, W = x.shape
    Cout, Hc, Wc = weight.shape[0], H - 1, W - 1
    OH, OW = (cdiv(Hc, 2), cdiv(Wc, 2)) if pool else (Hc, Wc)  # windows covering every conv pixel
    n_rows, n_pix = B * OH * OW, B * Hc * Wc
    fused_wgrad = npr and not need_dx  # the stem's weight gradient with d(conv out) never in memory
    tiles, grid = _grid("snet_block_bwd", x, weight, n_rows, pool, compute_dtype, precision, BLOCK_CI=Cin)
    bn = (bias, gamma, beta, mean, var, eps)
    routing = (grad, argmax if pool else grad)
    x_nhwc, dots = nhwc(x), gemm_dot_args(compute_dtype, precision)
    dy_part = torch.empty((grid[0], 1, 2 * Cout), dtype=torch.float32, device=x.device)  # each program its own
    # The conv output, then its gradient (in place).
    dz = dy_part if fused_wgrad else torch.empty((n_pix, Cout), dtype=compute_dtype, device=x.device)
    if n_rows:
        launch(_snet_block_dy_sums_kernel, grid, x_nhwc, w_packed, *bn, *routing, dy_part, dz, n_rows, H, W, OH, OW,
               Cin, Cout, POOL=pool, NPR=npr, STORE_Z=not fused_wgrad, **tiles, **dots)
    # The sums of dy, then dy * zhat: the gradients of beta and gamma, and over n_stats values the means
    # d(conv out) needs (zero when the statistics are not the batch's).
    sums = sum_partials(dy_part, torch.empty((2, Cout), dtype=torch.float32, device=x.device))
    n_stats = float(n_pix) if batch_stats else 0.0
    if fused_wgrad:
        tiles, grid = _grid("snet_stem_wgrad", x, weight, n_rows, pool, compute_dtype, precision)
        part = torch.empty((grid[0], 4, Cout * Cin), dtype=torch.float32, device=x.device)
        dbias = torch.empty((grid[0], 1, Cout), dtype=torch.float32, device=x.device)
        if n_rows:
            launch(_snet_stem_wgrad_kernel, grid, x.contiguous(), weight.contiguous(), *bn, *routing, sums, n_stats,
                   part, dbias, n_rows, H, W, OH, OW, Cin, Cout, POOL=pool, **tiles,
                   OPERAND_DTYPE=dot_args(compute_dtype, precision)["OPERAND_DTYPE"])
        dweight = sum_partials(part, torch.empty(weight.shape, dtype=weight.dtype, device=x.device))
    else:
        tiles, grid = _grid("snet_block_dz", x, weight, n_rows, pool, compute_dtype, precision)
        dbias = torch.empty((grid[0], 1, Cout), dtype=torch.float32, device=x.device)
        if n_rows:
            launch(_snet_block_dz_kernel, grid, dz, *bn, *routing, sums, n_stats, dbias, n_rows, H, W, OH, OW,
                   Cout, POOL=pool, **tiles)
        dweight = launch_conv2x2_dw(dz, x, Cout, npr, compute_dtype, precision, weight.dtype)
    dbias = sum_partials(dbias, torch.empty(bias.shape, dtype=bias.dtype, device=x.device))
    dx = x.new_empty(0)
    if need_dx:
        dx = launch_conv2x2_dx(dz, x, weight, compute_dtype, precision)
        if npr:  # dx so far is the gradient at the residual
            dx = npr_residual_backward(dx, x, 2, True)
    return dx, dweight, dbias, sums.to(gamma.dtype)


_snet_block_backward_op = torch.library.custom_op("lfm::snet_block_backward", _snet_block_backward, mutates_args=())


@_snet_block_backward_op.register_fake
def _(grad, x, weight, w_packed, bias, gamma, beta, mean, var, argmax, eps, batch_stats, pool, npr, precision,
      compute_dtype, need_dx):
    # dx as the kernels write it: channels_last, or contiguous from the residual's backward with npr.
    layout = torch.contiguous_format if npr else torch.channels_last
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout) if need_dx else x.new_empty(0)
    dweight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    return dx, dweight, torch.empty_like(bias), gamma.new_empty((2, gamma.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, gamma, beta, _, _, eps, batch_stats, pool, npr, precision, compute_dtype = inputs
    _, argmax, mean_used, var_used, targets, w_packed = output
    ctx.save_for_backward(x, weight, w_packed, bias, gamma, beta, mean_used, var_used, argmax)
    ctx.options = (eps, batch_stats, pool, npr, precision, compute_dtype)
    ctx.mark_non_differentiable(argmax, mean_used, var_used, targets, w_packed)


def _backward(ctx, grad, *_no_gradients):
    need_dx = ctx.needs_input_grad[0]
    dx, dweight, dbias, dbn = call_op(
        torch.ops.lfm.snet_block_backward, _snet_block_backward, grad.contiguous(memory_format=torch.channels_last),
        *ctx.saved_tensors, *ctx.options, need_dx)
    return (dx if need_dx else None), dweight, dbias, dbn[1], dbn[0], *(None,) * 8


_snet_block_train_autograd = register_autograd(_snet_block_train_op, _snet_block_train, _backward, _setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def block_signature(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, pool,
                    input_precision) -> tuple:
    """What check_block reads of its arguments (checks.once_per_signature): the tensors' shapes, dtypes and
    devices, the flags, and whether autocast is on for x's device."""
    tensors = tensors_signature(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var)
    return (*tensors, bool(training), bool(pool), flag_signature(input_precision),
            isinstance(x, torch.Tensor) and autocast_enabled(x))


def check_block(*args):
    """snet_block's argument checks (snet_head's too), the same ValueErrors on every backend; arguments as
    _check_block's, run once per signature."""
    once_per_signature(_check_block, block_signature, *args)


def _check_block(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, pool,
                 input_precision):
    check_float_tensor("x", x, 4)
    check_float_tensor("conv_weight", conv_weight, 4)
    Cout, Cin = conv_weight.shape[:2]
    if conv_weight.shape[2:] != (2, 2) or Cin != x.shape[1] or Cin == 0 or Cout == 0:
        raise ValueError(f"conv_weight must have shape (Cout, {x.shape[1]}, 2, 2) with Cout >= 1 for x with "
                         f"{x.shape[1]} channels (at least 1), got {tuple(conv_weight.shape)}")
    named = dict(conv_bias=conv_bias, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean,
                 running_var=running_var)
    for name, t in named.items():
        if t is not None and tuple(t.shape) != (Cout,):
            raise ValueError(f"{name} must have shape ({Cout},), got {tuple(t.shape)}")
    if bn_weight is None or bn_bias is None:
        raise ValueError("bn_weight and bn_bias are required")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("eval mode needs running_mean and running_var")
    check_same_device(x=x, conv_weight=conv_weight, **{n: t for n, t in named.items() if t is not None})
    check_conv_dtypes(x=x, conv_weight=conv_weight, conv_bias=conv_bias)
    for pair in (("bn_weight", "bn_bias"), ("running_mean", "running_var")):  # F.batch_norm refuses a mix too
        a, b = (named[n] for n in pair)
        if a is not None and b is not None and a.dtype != b.dtype:
            raise ValueError(f"{pair[0]} and {pair[1]} must have one dtype, got {a.dtype} and {b.dtype}")
    min_size = 3 if pool else 2
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f"x must be at least {min_size}x{min_size} for a 2x2 conv{' and pool' if pool else ''}, "
                         f"got {x.shape[2]}x{x.shape[3]}")
    if training and x.shape[0] * (x.shape[2] - 1) * (x.shape[3] - 1) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)} "
                         "(one conv output per channel)")
    check_precision(input_precision)


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv_bias_or_zeros(conv_weight, conv_bias):
    return conv_bias if conv_bias is not None else conv_weight.new_zeros(conv_weight.shape[0])


def snet_block(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, *, eps=1e-5, momentum=0.1,
               training=False, pool=True, npr=False, input_precision=None, backend=None):
    """maxpool2x2(relu(batchnorm(conv2d_2x2(abs_npr(x) if npr else x)))), fused; see the module docstring.

    nn.BatchNorm2d semantics: in training, batch statistics, and running statistics (when given)
    updated in place with `momentum` and the unbiased variance (not on an empty batch). Float32 inputs
    use TF32 tensor cores when torch allows them for cuDNN convolutions (input_precision=None), or as
    input_precision ("tf32" or "ieee") says; the stem (npr) always computes in full float32.
    """
    check_block(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, pool,
                input_precision)
    trains = training or needs_grad(x, conv_weight, conv_bias, bn_weight, bn_bias)
    if resolve_backend(backend, x, f"snet_block/cin={x.shape[1]}", trains) == "torch":
        if not trains:
            return snet_block_inference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                        eps=eps, pool=pool, npr=npr)
        if training and fast_training(x, conv_weight, conv_bias, bn_weight, bn_bias):
            return snet_block_train(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                    eps=eps, momentum=momentum, pool=pool, npr=npr)
        return snet_block_reference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=eps,
                                    momentum=momentum, training=training, pool=pool, npr=npr)
    x, compute_dtype = conv_input("x", x, keep_dtype=npr)
    precision = resolve_precision(input_precision)
    bias = conv_bias_or_zeros(conv_weight, conv_bias)
    if not trains:
        return call_op(torch.ops.lfm.snet_block_eval, _snet_block_eval, x, conv_weight, bias, bn_weight, bn_bias,
                       running_mean, running_var, eps, pool, npr, precision, compute_dtype)
    stats = (running_mean, running_var) if running_mean is not None else (bn_weight, bn_weight)  # unused when training
    out, _, _, _, targets, _ = _snet_block_train_autograd(x, conv_weight, bias, bn_weight, bn_bias, *stats, eps,
                                                          bool(training), pool, npr, precision, compute_dtype)
    if training:
        update_running_stats(running_mean, running_var, targets, x.shape[0] * (x.shape[2] - 1) * (x.shape[3] - 1),
                             momentum)
    return out
