"""SNet blocks fused: [abs-NPR residual ->] 2x2 conv -> BatchNorm -> ReLU [-> 2x2 max-pool] in one pass.

snet_block(x, ...) == maxpool2x2(relu(batchnorm(conv2d_2x2(abs_npr(x) if npr else x)))) with
nn.BatchNorm2d semantics. snet_head(x, ...) == score_topk(snet_block(x, ..., pool=False), score_weight, k):
LFM's block 4 and its 1x1 scoring conv, the 512-channel map never written.

The conv is conv2x2.py's implicit GEMM on tensor cores (tl.dot, fp32 accumulation). Programs own
"groups": 2x2 cells of conv outputs, i.e. one max-pool window, computed one position after another
into one accumulator, so the pool happens in registers and only conv outputs a window uses are
computed. BatchNorm is applied in the kernel as a per-channel
scale and shift computed there from the conv bias, gamma, beta, mean and variance (Cout values),
so no folded copy of the weights exists that a parameter update could leave stale. Training runs
a statistics pass first (per-program partial count/mean/M2, merged in a fixed order: deterministic,
no atomics). The forward saves only the block input, the statistics and a uint8 window argmax; the
backward recomputes the conv. ReLU and max-pool propagate NaN as PyTorch does. Kernels:
  _snet_block_fwd_kernel    forward: STATS_PASS writes partial statistics, else normalize/ReLU/pool/write
  _snet_block_bwd_kernel    backward through pool, ReLU and BN: SUMS_PASS partial sums, else writes d(conv out)
                            (then conv2x2.py's input and weight gradients)
  _snet_head_kernel         block 4 + BatchNorm + ReLU + 1x1 scoring + per-chunk Top-K candidates
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import torch_inference, torch_training

# The same names as score_topk.py's import below: both ops validate with backend's checks (duplicates pairs them).
from .backend import on_input_device, resolve_backend
from .checks import check_float_tensor, check_k, check_kernel_k, check_same_device
from .configs import fill_target, halve_to_fill, launch, launch_config
from .conv2x2 import conv2x2_at, dot_operand, launch_conv2x2_dw, launch_conv2x2_dx
from .npr_residual import npr_residual_reference
from .precision import autocast_dtype, check_kernel_dtype, check_precision, dot_args, resolve_precision
from .randomness import check_drop
from .score_topk import score_topk
from .selection import EMPTY_KEY, NO_POSITION, merge_candidates, select_chunks, sortable_key, write_candidates
from .topk_pool import topk_pool_reference


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


def snet_head_reference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, score_weight, k, *,
                        eps=1e-5, drop=None, training=False, return_indices=False):
    feat = snet_block_reference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=eps,
                                training=training, pool=False)
    return topk_pool_reference(F.conv2d(feat, score_weight), k, drop=drop, training=training,
                               return_indices=return_indices)


# ---------------------------------------------------------------------------------------------
# Triton helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _relu(v):
    """max(v, 0) with NaN kept, as torch.relu (tl.maximum alone returns the non-NaN operand)."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _batchnorm_affine(bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, co, co_live):
    """[1, BLOCK_CO] scale and shift with conv(x) * scale + shift == batchnorm(conv(x) + bias), from Cout
    values of each vector (float32, correctly rounded)."""
    bias = tl.load(bias_ptr + co, mask=co_live, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + co, mask=co_live, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + co, mask=co_live, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + co, mask=co_live, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + co, mask=co_live, other=1.0).to(tl.float32)
    scale = tl.div_rn(gamma, tl.sqrt_rn(var + eps))
    return scale[None, :], ((bias - mean) * scale + beta)[None, :]


@triton.jit
def _block_program(pid, n_groups, GH, GW, Cout, BLOCK_G: tl.constexpr, BLOCK_CO: tl.constexpr):
    """A block-kernel program's groups (2x2 cells of conv outputs: b, gh, gw and which are live) and its
    output channels (co, co_live)."""
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    gw = g % GW
    gh = (g // GW) % GH
    b = g // (GW * GH)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    return g < n_groups, b, gh, gw, co, co < Cout


@triton.jit
def _group_position_conv(pos, x_ptr, w_ptr, base, gh, gw, live, co, co_live, Cin, H, W, Hc, Wc, sxc, sxh, sxw,
                         swo, swi, swh, sww, NPR: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CI: tl.constexpr,
                         BLOCK_CO: tl.constexpr, OPERAND_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Position pos (0..3, row-major) of each group's 2x2 cell: its conv pixel (r, c), whether it lies in
    the (Hc, Wc) conv output, and its [BLOCK_G, BLOCK_CO] conv outputs without bias."""
    r = gh * 2 + pos // 2
    c = gw * 2 + pos % 2
    a = conv2x2_at(x_ptr, w_ptr, base, r, c, live, co, co_live, Cin, H, W, sxc, sxh, sxw, swo, swi, swh, sww,
                   NPR, BLOCK_G, BLOCK_CI, BLOCK_CO, OPERAND_DTYPE, DOT_DTYPE, PRECISION)
    return r, c, live & (r < Hc) & (c < Wc), a


@triton.jit
def _zhat_dy(a, bias, mean, rstd, gamma, beta, da, valid):
    """Recomputed normalized conv output and the gradient at the BatchNorm output (through ReLU)."""
    zhat = (a + bias - mean) * rstd
    dy = tl.where(valid[:, None] & (zhat * gamma + beta > 0), da, 0.0)
    return zhat, dy


@triton.jit
def _store_dz(dz_ptr, dy, zhat, g, c1, c2, b, r, c, Hc, Wc, Cout, co, co_live, valid, BATCH_STATS: tl.constexpr):
    """d(conv out) = gamma*rstd*(dy - mean(dy) - zhat*mean(dy*zhat)) with batch statistics, gamma*rstd*dy without."""
    if BATCH_STATS:
        dz = g * (dy - c1 - zhat * c2)
    else:
        dz = g * dy
    at = ((b.to(tl.int64) * Hc + r) * Wc + c) * Cout
    tl.store(dz_ptr + at[:, None] + co[None, :], dz, mask=valid[:, None] & co_live[None, :])


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _snet_block_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr, argmax_ptr,
    part_count_ptr, part_mean_ptr, part_m2_ptr, eps,
    n_groups, GH, GW, Cin, Cout, H, W, Hc, Wc,
    sxb, sxc, sxh, sxw, swo, swi, swh, sww, sob, soc, soh, sow,
    STATS_PASS: tl.constexpr, SAVE_ARGMAX: tl.constexpr, POOL: tl.constexpr, NPR: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Forward of one SNet block. Grid: (cdiv(n_groups, BLOCK_G), cdiv(Cout, BLOCK_CO)).

    Groups are 2x2 cells of conv outputs (B*GH*GW of them). Reads the block input x (any strides;
    the image with NPR) and the weight, then:
      STATS_PASS: writes this program's valid-position count and per-channel mean and M2 of
         conv + bias to part_count[pid], part_mean[pid, :], part_m2[pid, :] (merged later in a fixed order).
      else: y = relu(batchnorm(conv + bias)) with the given mean and var, pooled or not; writes out
         and, with SAVE_ARGMAX, the uint8 window argmax (0..3, first max wins, NaN wins as in max_pool2d).
    """
    pid = tl.program_id(0)
    live, b, gh, gw, co, co_live = _block_program(pid, n_groups, GH, GW, Cout, BLOCK_G, BLOCK_CO)
    base = b.to(tl.int64) * sxb
    at = b.to(tl.int64)[:, None] * sob + co[None, :] * soc
    if STATS_PASS:  # running count, mean and M2 over the positions so far (Chan's merge, fixed order)
        bias = tl.load(bias_ptr + co, mask=co_live, other=0.0).to(tl.float32)[None, :]
        n = tl.zeros([BLOCK_CO], dtype=tl.float32)
        mean = tl.zeros([BLOCK_CO], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_CO], dtype=tl.float32)
    else:
        scale, shift = _batchnorm_affine(bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, co, co_live)
        best = tl.full([BLOCK_G, BLOCK_CO], -1.0, dtype=tl.float32)  # below any ReLU output
        arg = tl.zeros([BLOCK_G, BLOCK_CO], dtype=tl.int32)
    # The four conv outputs of each group (one pool window) one after another, so that a program holds
    # one accumulator tile rather than four.
    for pos in range(4):
        r, c, valid, a = _group_position_conv(pos, x_ptr, w_ptr, base, gh, gw, live, co, co_live, Cin, H, W, Hc, Wc,
                                              sxc, sxh, sxw, swo, swi, swh, sww, NPR, BLOCK_G, BLOCK_CI, BLOCK_CO,
                                              OPERAND_DTYPE, DOT_DTYPE, PRECISION)
        if STATS_PASS:
            a += bias
            n_here = tl.sum(valid.to(tl.float32), axis=0)
            mean_here = tl.sum(tl.where(valid[:, None], a, 0.0), axis=0) / tl.maximum(n_here, 1.0)
            d = a - mean_here[None, :]
            m2_here = tl.sum(tl.where(valid[:, None], d * d, 0.0), axis=0)
            total = n + n_here
            delta = mean_here - mean
            mean += delta * (n_here / tl.maximum(total, 1.0))
            m2 += m2_here + delta * delta * (n * n_here / tl.maximum(total, 1.0))
            n = total
        else:
            y = _relu(a * scale + shift)
            if POOL:  # first max wins, a NaN always (as max_pool2d)
                arg = tl.where((y > best) | (y != y), pos, arg)
                best = tl.maximum(best, y, propagate_nan=tl.PropagateNan.ALL)
            else:
                tl.store(out_ptr + at + (r * soh + c * sow)[:, None], y.to(out_ptr.dtype.element_ty),
                         mask=valid[:, None] & co_live[None, :])
    if STATS_PASS:
        tl.store(part_count_ptr + pid, tl.max(n, axis=0))
        tl.store(part_mean_ptr + pid * Cout + co, mean, mask=co_live)
        tl.store(part_m2_ptr + pid * Cout + co, m2, mask=co_live)
    elif POOL:
        ok = live[:, None] & co_live[None, :]
        pix = (gh * soh + gw * sow)[:, None]
        tl.store(out_ptr + at + pix, best.to(out_ptr.dtype.element_ty), mask=ok)
        if SAVE_ARGMAX:  # argmax has out's strides
            tl.store(argmax_ptr + at + pix, arg.to(tl.uint8), mask=ok)


_NO_WINDOW_POSITION = tl.constexpr(4)  # argmax of a masked-off window: matches none of positions 0..3


@triton.jit
def _snet_block_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, grad_ptr, argmax_ptr, c1_ptr, c2_ptr,
    sdy_ptr, sdyz_ptr, dz_ptr,
    n_groups, GH, GW, Cin, Cout, H, W, Hc, Wc, Hp, Wp,
    sxb, sxc, sxh, sxw, swo, swi, swh, sww, sgb, sgc, sgh, sgw, sab, sac, sah, saw,
    SUMS_PASS: tl.constexpr, POOL: tl.constexpr, NPR: tl.constexpr, BATCH_STATS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward through pool, ReLU and BatchNorm. Grid: (cdiv(n_groups, BLOCK_G), cdiv(Cout, BLOCK_CO)).

    Recomputes the conv of x for B*GH*GW groups (every conv output), routes the output gradient
    through the saved window argmax (or directly without pool) and the ReLU. SUMS_PASS writes this
    program's per-channel sums of dy and dy*zhat to sdy[pid, :], sdyz[pid, :]; the second pass reads
    their means c1, c2 and writes d(conv out) as float32 (B, Hc, Wc, Cout) to dz.
    """
    pid = tl.program_id(0)
    live, b, gh, gw, co, co_live = _block_program(pid, n_groups, GH, GW, Cout, BLOCK_G, BLOCK_CO)
    base = b.to(tl.int64) * sxb
    bias = tl.load(bias_ptr + co, mask=co_live, other=0.0).to(tl.float32)[None, :]
    mean = tl.load(mean_ptr + co, mask=co_live, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + co, mask=co_live, other=0.0)[None, :]
    gamma = tl.load(gamma_ptr + co, mask=co_live, other=0.0).to(tl.float32)[None, :]
    beta = tl.load(beta_ptr + co, mask=co_live, other=0.0).to(tl.float32)[None, :]
    gb = b.to(tl.int64)[:, None] * sgb + co[None, :] * sgc
    if POOL:
        pooled = (live & (gh < Hp) & (gw < Wp))[:, None] & co_live[None, :]
        dp = tl.load(grad_ptr + gb + (gh * sgh + gw * sgw)[:, None], mask=pooled, other=0.0).to(tl.float32)
        arg = tl.load(argmax_ptr + b.to(tl.int64)[:, None] * sab + co[None, :] * sac + (gh * sah + gw * saw)[:, None],
                      mask=pooled, other=_NO_WINDOW_POSITION).to(tl.int32)
    if SUMS_PASS:
        sdy = tl.zeros([BLOCK_CO], dtype=tl.float32)
        sdyz = tl.zeros([BLOCK_CO], dtype=tl.float32)
    else:
        g = gamma * rstd
        c1 = tl.load(c1_ptr + co, mask=co_live, other=0.0)[None, :]
        c2 = tl.load(c2_ptr + co, mask=co_live, other=0.0)[None, :]
    for pos in range(4):  # the group's four conv outputs one after another, as in the forward
        r, c, valid, a = _group_position_conv(pos, x_ptr, w_ptr, base, gh, gw, live, co, co_live, Cin, H, W, Hc, Wc,
                                              sxc, sxh, sxw, swo, swi, swh, sww, NPR, BLOCK_G, BLOCK_CI, BLOCK_CO,
                                              OPERAND_DTYPE, DOT_DTYPE, PRECISION)
        if POOL:
            da = tl.where(arg == pos, dp, 0.0)
        else:
            da = tl.load(grad_ptr + gb + (r * sgh + c * sgw)[:, None], mask=valid[:, None] & co_live[None, :],
                         other=0.0).to(tl.float32)
        zhat, dy = _zhat_dy(a, bias, mean, rstd, gamma, beta, da, valid)
        if SUMS_PASS:
            sdy += tl.sum(dy, axis=0)
            sdyz += tl.sum(dy * zhat, axis=0)
        else:
            _store_dz(dz_ptr, dy, zhat, g, c1, c2, b, r, c, Hc, Wc, Cout, co, co_live, valid, BATCH_STATS)
    if SUMS_PASS:
        tl.store(sdy_ptr + pid * Cout + co, sdy, mask=co_live)
        tl.store(sdyz_ptr + pid * Cout + co, sdyz, mask=co_live)


@triton.jit
def _snet_head_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, ws_ptr, cand_key_ptr, cand_pos_ptr, part_ptr,
    eps, B, Cin, C4, CS, H, W, Hc, Wc, sxb, sxc, sxh, sxw, swo, swi, swh, sww, sso, ssi, k, M, n_splits,
    c4_per_split,
    SPLIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_C4: tl.constexpr,
    BLOCK_CS: tl.constexpr, OPERAND_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Block 4 + BatchNorm + ReLU + 1x1 scoring + Top-K candidates.
    Grid: (B * n_splits, cdiv(Hc*Wc, BLOCK_P), cdiv(CS, BLOCK_CS)).

    For BLOCK_P conv positions of image b: the block-4 conv, BatchNorm (running statistics) and ReLU,
    then score[p, cs] += feat[p, c4 block] @ score_weight[cs, c4 block]^T, C4 block by C4 block, so
    the C4-channel feature map stays in registers. Writes each score channel's k best (key,
    position) to candidate slots [chunk*k, chunk*k + k) of the (B*CS, M) buffers, merged by
    selection's merge. More than BLOCK_CS score channels take more programs (each recomputes the conv).
    SPLIT (small batches, to give every SM a program): program split s of n_splits takes channels
    [s * c4_per_split, (s + 1) * c4_per_split) of C4 and writes its float32 partial scores to
    part[s, b, cs, p] of the (n_splits, B, CS, Hc*Wc) buffer instead; selection's chunk kernel sums
    them in split order (the score is linear in the channels; BatchNorm and ReLU act per channel).
    """
    b = tl.program_id(0) // n_splits
    split = tl.program_id(0) % n_splits
    chunk = tl.program_id(1)
    p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    live = p < Hc * Wc
    r = p // Wc
    c = p % Wc
    base = b.to(tl.int64) * sxb + tl.zeros([BLOCK_P], dtype=tl.int64)
    cs = tl.program_id(2) * BLOCK_CS + tl.arange(0, BLOCK_CS)
    cs_live = cs < CS
    score = tl.zeros([BLOCK_P, BLOCK_CS], dtype=tl.float32)
    c4_start = split * c4_per_split
    # A channel-block loop as conv2x2's dx loop; bodies differ.
    for c40 in range(c4_start, tl.minimum(c4_start + c4_per_split, C4), BLOCK_C4):
        c4 = c40 + tl.arange(0, BLOCK_C4)
        c4_live = c4 < C4
        acc = conv2x2_at(x_ptr, w_ptr, base, r, c, live, c4, c4_live, Cin, H, W, sxc, sxh, sxw, swo, swi, swh, sww,
                          False, BLOCK_P, BLOCK_CI, BLOCK_C4, OPERAND_DTYPE, DOT_DTYPE, PRECISION)
        scale, shift = _batchnorm_affine(bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, c4, c4_live)
        feat = _relu(acc * scale + shift)
        ws = tl.load(ws_ptr + c4[:, None] * ssi + cs[None, :] * sso, mask=c4_live[:, None] & cs_live[None, :],
                     other=0.0)
        score = tl.dot(dot_operand(feat, OPERAND_DTYPE, DOT_DTYPE), dot_operand(ws, OPERAND_DTYPE, DOT_DTYPE), score,
                       input_precision=PRECISION)
    ok = live[:, None] & cs_live[None, :]
    if SPLIT:
        at = ((split * B + b).to(tl.int64) * CS + cs[None, :]) * (Hc * Wc) + p[:, None]
        tl.store(part_ptr + at, score, mask=ok)
    else:
        keys = tl.trans(tl.where(ok, sortable_key(score), EMPTY_KEY))
        pos = tl.trans(tl.where(ok, p[:, None] + tl.zeros([BLOCK_P, BLOCK_CS], tl.int32), NO_POSITION))
        write_candidates(keys, pos, cand_key_ptr, cand_pos_ptr, b * CS + cs, cs_live, chunk * k, M, k)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _launch_block_fwd(x, w, bias, gamma, beta, mean, var, eps, *, stats_pass, pool, npr, precision, compute_dtype,
                      save_argmax=False):
    """Output pass: returns (out, the window argmax with save_argmax and pool, else None). Statistics pass
    (stats_pass=True; gamma, beta, mean and var unused): returns the per-program (count, mean, M2)."""
    B, Cin, H, W = x.shape
    Cout, Hc, Wc = w.shape[0], H - 1, W - 1
    whole = stats_pass or not pool  # every conv output, or only those inside a pool window
    GH, GW = (triton.cdiv(Hc, 2), triton.cdiv(Wc, 2)) if whole else (Hc // 2, Wc // 2)
    n_groups = B * GH * GW
    tiles = launch_config("snet_block_fwd", x.device, compute_dtype, precision, BLOCK_CI=Cin, BLOCK_CO=Cout)
    # Small batches: narrower channel blocks until every SM has a program (block 3 at batch 1 on sm_90).
    halve_to_fill(tiles, "BLOCK_CO", lambda t: triton.cdiv(n_groups, t["BLOCK_G"]) * triton.cdiv(Cout, t["BLOCK_CO"]),
                  fill_target(x.device))
    grid = (triton.cdiv(n_groups, tiles["BLOCK_G"]), triton.cdiv(Cout, tiles["BLOCK_CO"]))
    dev = x.device
    if stats_pass:
        count = torch.empty(grid[0], dtype=torch.float32, device=dev)
        part_mean = torch.empty((grid[0], Cout), dtype=torch.float32, device=dev)
        part_m2 = torch.empty((grid[0], Cout), dtype=torch.float32, device=dev)
        out = argmax = count
        out_strides = (0, 0, 0, 0)
    else:
        shape = (B, Cout, GH, GW) if pool else (B, Cout, Hc, Wc)
        out = torch.empty(shape, dtype=compute_dtype, device=dev, memory_format=torch.channels_last)
        argmax = torch.empty(shape, dtype=torch.uint8, device=dev, memory_format=torch.channels_last) \
            if pool and save_argmax else None
        count = part_mean = part_m2 = out
        out_strides = out.stride()
    if n_groups:
        launch(_snet_block_fwd_kernel, grid, x, w, bias, gamma, beta, mean, var, out,
               argmax if argmax is not None else out, count, part_mean, part_m2, eps,
               n_groups, GH, GW, Cin, Cout, H, W, Hc, Wc, *x.stride(), *w.stride(), *out_strides,
               STATS_PASS=stats_pass, SAVE_ARGMAX=argmax is not None, POOL=pool, NPR=npr, **tiles,
               **dot_args(compute_dtype, precision))
    return (count, part_mean, part_m2) if stats_pass else (out, argmax)


def _batch_stats(x, w, bias, npr, precision, compute_dtype):
    """Per-channel mean and biased variance of conv(x) + bias, merged from per-program (count, mean, M2)."""
    count, mean, m2 = _launch_block_fwd(x, w, bias, bias, bias, bias, bias, 0.0, stats_pass=True, pool=False, npr=npr,
                                        precision=precision, compute_dtype=compute_dtype)
    n = count.sum()
    mu = (count[:, None] * mean).sum(0) / n
    var = (m2.sum(0) + (count[:, None] * (mean - mu) ** 2).sum(0)) / n
    return mu, var


def _launch_block_bwd(grid, args, common, flags, sdy, sdyz, dz, means=None):
    """Without means: the per-program sums of dy and dy*zhat into sdy, sdyz (SUMS_PASS). With their
    means (c1, c2): d(conv out) into dz."""
    c1, c2 = means if means is not None else (sdy, sdy)
    launch(_snet_block_bwd_kernel, grid, *args, c1, c2, sdy, sdyz, dz, *common, SUMS_PASS=means is None, **flags)


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------
def _out_shape(x, w, pool):
    B, _, H, W = x.shape
    Hc, Wc = H - 1, W - 1
    return (B, w.shape[0], Hc // 2, Wc // 2) if pool else (B, w.shape[0], Hc, Wc)


def _fake_out(x, w, pool, dtype):
    return torch.empty(_out_shape(x, w, pool), dtype=dtype, device=x.device, memory_format=torch.channels_last)


@torch.library.custom_op("lfm::snet_block_eval", mutates_args=())
@on_input_device
def _snet_block_eval_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                        beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float, pool: bool, npr: bool,
                        precision: str, compute_dtype: torch.dtype) -> torch.Tensor:
    """Inference with the running statistics: one launch, BatchNorm applied in the kernel."""
    return _launch_block_fwd(x, weight, bias, gamma, beta, mean, var, eps, stats_pass=False, pool=pool, npr=npr,
                             precision=precision, compute_dtype=compute_dtype)[0]


@_snet_block_eval_op.register_fake
def _(x, weight, bias, gamma, beta, mean, var, eps, pool, npr, precision, compute_dtype):
    return _fake_out(x, weight, pool, compute_dtype)


@torch.library.custom_op("lfm::snet_block_train", mutates_args=())
@on_input_device
def _snet_block_train_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                         beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float, batch_stats: bool,
                         pool: bool, npr: bool, precision: str, compute_dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward with BatchNorm statistics of the batch (batch_stats) or the given mean/var; returns
    (out, window argmax or an empty tensor, mean used, biased variance used)."""
    if batch_stats:
        mean_used, var_used = _batch_stats(x, weight, bias, npr, precision, compute_dtype)
    else:
        mean_used, var_used = mean.float().clone(), var.float().clone()
    out, argmax = _launch_block_fwd(x, weight, bias, gamma, beta, mean_used, var_used, eps, stats_pass=False,
                                    pool=pool, npr=npr, precision=precision, compute_dtype=compute_dtype,
                                    save_argmax=True)
    if argmax is None:
        argmax = torch.empty(0, dtype=torch.uint8, device=x.device)
    return out, argmax, mean_used, var_used


@_snet_block_train_op.register_fake
def _(x, weight, bias, gamma, beta, mean, var, eps, batch_stats, pool, npr, precision, compute_dtype):
    argmax = _fake_out(x, weight, pool, torch.uint8) if pool else x.new_empty(0, dtype=torch.uint8)
    stats = x.new_empty(weight.shape[0], dtype=torch.float32)
    return _fake_out(x, weight, pool, compute_dtype), argmax, stats, torch.empty_like(stats)


@torch.library.custom_op("lfm::snet_block_backward", mutates_args=())
@on_input_device
def _snet_block_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                            argmax: torch.Tensor, eps: float, batch_stats: bool, pool: bool, npr: bool,
                            precision: str, compute_dtype: torch.dtype, need_dx: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx or an empty tensor, dweight, dbias, dgamma, dbeta): two passes through pool, ReLU and
    BatchNorm to d(conv out), then its weight and input gradients."""
    B, Cin, H, W = x.shape
    Cout, Hc, Wc = weight.shape[0], H - 1, W - 1
    GH, GW = triton.cdiv(Hc, 2), triton.cdiv(Wc, 2)
    n_groups, n_pos = B * GH * GW, B * Hc * Wc
    tiles = launch_config("snet_block_bwd", x.device, compute_dtype, precision, BLOCK_CI=Cin, BLOCK_CO=Cout)
    dots = dot_args(compute_dtype, precision)
    grid = (triton.cdiv(n_groups, tiles["BLOCK_G"]), triton.cdiv(Cout, tiles["BLOCK_CO"]))
    rstd = torch.rsqrt(var + eps)
    sdy = torch.zeros((grid[0], Cout), dtype=torch.float32, device=x.device)
    sdyz = torch.zeros_like(sdy)
    dz = torch.empty((n_pos, Cout), dtype=torch.float32, device=x.device)
    args = (x, weight, bias, mean, rstd, gamma, beta, grad, argmax if pool else grad)
    common = (n_groups, GH, GW, Cin, Cout, H, W, Hc, Wc, Hc // 2, Wc // 2, *x.stride(), *weight.stride(),
              *grad.stride(), *(argmax.stride() if pool else (0, 0, 0, 0)))
    flags = dict(POOL=pool, NPR=npr, BATCH_STATS=batch_stats, **tiles, **dots)
    if n_groups:
        _launch_block_bwd(grid, args, common, flags, sdy, sdyz, dz)
    dbeta, dgamma = sdy.sum(0), sdyz.sum(0)
    if n_groups:
        _launch_block_bwd(grid, args, common, flags, sdy, sdyz, dz, means=(dbeta / n_pos, dgamma / n_pos))
    dweight = launch_conv2x2_dw(dz, x, Cout, npr, compute_dtype, precision).to(weight.dtype).contiguous()
    dbias = dz.sum(0).to(bias.dtype)
    dx = x.new_empty(0)
    if need_dx:
        dx = launch_conv2x2_dx(dz, x, weight, compute_dtype, precision)
        if npr:  # dx so far is the gradient at the residual
            dx = torch.ops.lfm.npr_residual_backward(dx, x, 2, True)
    return dx, dweight, dbias, dgamma.to(gamma.dtype), dbeta.to(beta.dtype)


@_snet_block_backward_op.register_fake
def _(grad, x, weight, bias, gamma, beta, mean, var, argmax, eps, batch_stats, pool, npr, precision, compute_dtype,
      need_dx):
    # dx as the kernels write it: channels_last, or contiguous from the residual's backward with npr.
    layout = torch.contiguous_format if npr else torch.channels_last
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout) if need_dx else x.new_empty(0)
    dweight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    return dx, dweight, torch.empty_like(bias), torch.empty_like(gamma), torch.empty_like(beta)


def _setup_context(ctx, inputs, output):
    x, weight, bias, gamma, beta, _, _, eps, batch_stats, pool, npr, precision, compute_dtype = inputs
    _, argmax, mean_used, var_used = output
    ctx.save_for_backward(x, weight, bias, gamma, beta, mean_used, var_used, argmax)
    ctx.options = (eps, batch_stats, pool, npr, precision, compute_dtype)
    ctx.mark_non_differentiable(argmax, mean_used, var_used)


def _backward(ctx, grad, _grad_argmax, _grad_mean, _grad_var):
    need_dx = ctx.needs_input_grad[0]
    dx, dweight, dbias, dgamma, dbeta = torch.ops.lfm.snet_block_backward(
        grad.contiguous(memory_format=torch.channels_last), *ctx.saved_tensors, *ctx.options, need_dx)
    return (dx if need_dx else None), dweight, dbias, dgamma, dbeta, None, None, None, None, None, None, None, None


_snet_block_train_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lfm::snet_head_eval", mutates_args=())
@on_input_device
def _snet_head_eval_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                       beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                       score_weight: torch.Tensor, k: int, precision: str, compute_dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference of block 4 (running statistics) + ReLU + 1x1 scoring + Top-K: (values, positions)."""
    B, Cin, H, W = x.shape
    C4, CS, Hc, Wc = weight.shape[0], score_weight.shape[0], H - 1, W - 1
    tiles = launch_config("snet_head", x.device, compute_dtype, precision, BLOCK_C4=C4, BLOCK_CS=CS)
    n_chunks = triton.cdiv(Hc * Wc, tiles["BLOCK_P"])
    n_splits, c4_per_split = _head_splits(tiles, B * n_chunks * triton.cdiv(CS, tiles["BLOCK_CS"]), C4,
                                          fill_target(x.device))
    M = n_chunks * k
    cand_key = torch.empty((B * CS, M if n_splits == 1 else 0), dtype=torch.int32, device=x.device)
    cand_pos = torch.empty_like(cand_key)
    part = torch.empty((n_splits, B, CS, Hc, Wc) if n_splits > 1 else 0, dtype=torch.float32, device=x.device)
    launch(_snet_head_kernel, (B * n_splits, n_chunks, triton.cdiv(CS, tiles["BLOCK_CS"])),
           x, weight, bias, gamma, beta, mean, var, score_weight, cand_key, cand_pos, part, eps,
           B, Cin, C4, CS, H, W, Hc, Wc, *x.stride(), *weight.stride(), score_weight.stride(0), score_weight.stride(1),
           k, M, n_splits, c4_per_split, SPLIT=n_splits > 1, **tiles, **dot_args(compute_dtype, precision))
    if n_splits > 1:
        cand_key, cand_pos = select_chunks(part, k)
    out = torch.empty((B, CS, k), dtype=compute_dtype, device=x.device)
    idx, _ = merge_candidates(cand_key, cand_pos, out, k)
    return out, idx.view(B, CS, k)


def _head_splits(tiles, programs, C4, target):
    """(n_splits, c4_per_split): how snet_head splits C4 so that every SM has a program at small batch (at
    most one split per channel block; BLOCK_C4 halves, down to 16, where that is not enough). One split,
    the fused path, once the batch fills the GPU."""
    def splits(t):
        blocks = triton.cdiv(C4, t["BLOCK_C4"])
        per_split = max(1, blocks // triton.cdiv(target, max(programs, 1)))
        return triton.cdiv(blocks, per_split), per_split * t["BLOCK_C4"]

    halve_to_fill(tiles, "BLOCK_C4", lambda t: programs * splits(t)[0], target)
    return splits(tiles)


@_snet_head_eval_op.register_fake
def _(x, weight, bias, gamma, beta, mean, var, eps, score_weight, k, precision, compute_dtype):
    B, CS = x.shape[0], score_weight.shape[0]
    return x.new_empty((B, CS, k), dtype=compute_dtype), x.new_empty((B, CS, k), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def _check_block(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, pool,
                 input_precision):
    check_float_tensor("x", x, 4)
    check_float_tensor("conv_weight", conv_weight, 4)
    Cout, Cin = conv_weight.shape[:2]
    if conv_weight.shape[2:] != (2, 2) or Cin != x.shape[1]:
        raise ValueError(f"conv_weight must have shape (Cout, {x.shape[1]}, 2, 2) for x with {x.shape[1]} channels, "
                         f"got {tuple(conv_weight.shape)}")
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
    min_size = 3 if pool else 2
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f"x must be at least {min_size}x{min_size} for a 2x2 conv{' and pool' if pool else ''}, "
                         f"got {x.shape[2]}x{x.shape[3]}")
    check_precision(input_precision)


def _kernel_input(x, npr):
    """(x as the kernels take it, the dtype the conv computes in). Under autocast the conv computes in
    autocast's dtype, as F.conv2d would (accumulation and statistics stay float32); the stem keeps the
    image in its own dtype, so the neighbor-pixel residual is taken before rounding, as the reference does."""
    compute_dtype = autocast_dtype(x) or x.dtype
    if not npr:
        x = x.to(compute_dtype)
    check_kernel_dtype("x", x)
    return x, compute_dtype


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _conv_bias(conv_weight, conv_bias):
    return conv_bias if conv_bias is not None else conv_weight.new_zeros(conv_weight.shape[0])


def snet_block(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, *, eps=1e-5, momentum=0.1,
               training=False, pool=True, npr=False, input_precision=None, backend=None):
    """maxpool2x2(relu(batchnorm(conv2d_2x2(abs_npr(x) if npr else x)))), fused; see the module docstring.

    nn.BatchNorm2d semantics: in training, batch statistics, and running statistics (when given)
    updated in place with `momentum` and the unbiased variance (not on an empty batch). Float32 inputs
    use TF32 tensor cores when torch allows them for cuDNN convolutions (input_precision=None), or as
    input_precision ("tf32" or "ieee") says.
    """
    _check_block(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, pool,
                 input_precision)
    if resolve_backend(backend, x) == "torch":
        if not training and not _needs_grad(x, conv_weight, conv_bias, bn_weight, bn_bias):
            return torch_inference.snet_block_inference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
                                                        running_var, eps=eps, pool=pool, npr=npr)
        if training and torch_training.fast_training(x, conv_weight, conv_bias, bn_weight, bn_bias):
            return torch_training.snet_block_train(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
                                                   running_var, eps=eps, momentum=momentum, pool=pool, npr=npr)
        return snet_block_reference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=eps,
                                    momentum=momentum, training=training, pool=pool, npr=npr)
    x, compute_dtype = _kernel_input(x, npr)
    precision = resolve_precision(input_precision)
    bias = _conv_bias(conv_weight, conv_bias)
    if not training and not _needs_grad(x, conv_weight, conv_bias, bn_weight, bn_bias):
        return torch.ops.lfm.snet_block_eval(x, conv_weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
                                             pool, npr, precision, compute_dtype)
    stats = (running_mean, running_var) if running_mean is not None else (bn_weight, bn_weight)  # unused when training
    out, _, mean, var = torch.ops.lfm.snet_block_train(x, conv_weight, bias, bn_weight, bn_bias, *stats, eps,
                                                       bool(training), pool, npr, precision, compute_dtype)
    n = x.shape[0] * (x.shape[2] - 1) * (x.shape[3] - 1)
    if training and running_mean is not None and n > 0:  # an empty batch leaves them alone, as nn.BatchNorm2d
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * n / max(n - 1, 1)).to(running_var.dtype), alpha=momentum)
    return out


def snet_head(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, score_weight, k, *, eps=1e-5,
              momentum=0.1, drop=None, training=False, return_indices=False, input_precision=None, backend=None):
    """score_topk(snet_block(x, ..., pool=False), score_weight, k, ...): LFM's block 4, 1x1 scoring and
    Top-K. In inference on the triton backend one kernel computes block 4 and the scores tile by
    tile, so the block-4 map never reaches memory; otherwise it is the composition of the two ops.
    The scoring uses the block's precision either way, so eval and training pick the same Top-K."""
    _check_block(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, False,
                 input_precision)
    check_float_tensor("score_weight", score_weight, 4)
    if score_weight.shape[1:] != (conv_weight.shape[0], 1, 1):
        raise ValueError(f"score_weight must have shape (Cs, {conv_weight.shape[0]}, 1, 1), got "
                         f"{tuple(score_weight.shape)}")
    check_k(k, (x.shape[2] - 1) * (x.shape[3] - 1))
    drop = check_drop(drop)
    inference = not training and not _needs_grad(x, conv_weight, conv_bias, bn_weight, bn_bias, score_weight)
    if not (inference and resolve_backend(backend, x) == "triton"):
        # The composition; on the torch backend in inference both ops take torch_inference's fast path.
        feat = snet_block(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=eps,
                          momentum=momentum, training=training, pool=False, input_precision=input_precision,
                          backend=backend)
        return score_topk(feat, score_weight, k, drop=drop, training=training, return_indices=return_indices,
                          input_precision=input_precision, backend=backend)
    check_kernel_k(k)
    x, compute_dtype = _kernel_input(x, False)
    values, idx = torch.ops.lfm.snet_head_eval(x, conv_weight, _conv_bias(conv_weight, conv_bias), bn_weight, bn_bias,
                                               running_mean, running_var, eps, score_weight, k,
                                               resolve_precision(input_precision), compute_dtype)
    return (values, idx) if return_indices else values
