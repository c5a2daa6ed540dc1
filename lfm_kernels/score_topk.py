"""1x1 scoring convolution fused with per-channel Top-K pooling and rank-based dropout.

score_topk(feat, weight, k) == topk_pool(conv2d(feat, weight), k) for a bias-free 1x1 weight
(Cout, Cin, 1, 1), without the (B, Cout, H, W) score map ever reaching memory: each program
computes a [Cout block, position chunk] tile of scores with tl.dot (float32 accumulation) and
keeps only that tile's k best per channel as candidates for topk_pool's merge kernel.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .backend import batch_folding_vmap, call_op, on_input_device, register_autograd, resolve_backend
from .checks import check_float_tensor, check_k, check_kernel_k, check_same_device
from .configs import cdiv, launch, launch_config
from .conv2x2 import packed_weight
from .precision import (
    check_conv_dtypes,
    check_kernel_dtype,
    check_precision,
    conv_input,
    dot_args,
    gemm_dot_args,
    resolve_precision,
)
from .randomness import check_drop, draw_seed, dropout_scale
from .selection import EMPTY_KEY, NO_POSITION, merge_candidates, scatter_rows, sortable_key, write_candidates
from .topk_pool import topk_pool, topk_pool_reference

# packed_weight's order of a (Cout, Cin, 1, 1) scoring weight: the (Cin, Cout) operand (snet_head's B operand,
# the feature gradient's A operand).
SCORE_OPERAND = (1, 0, 2, 3)


def score_topk_reference(feat, weight, k, *, drop=None, training=False, return_indices=False):
    return topk_pool_reference(F.conv2d(feat, weight), k, drop=drop, training=training,
                               return_indices=return_indices)


@triton.jit
def _score_topk_chunk_kernel(
    feat_ptr, w_ptr, cand_key_ptr, cand_pos_ptr,
    Cout, Cin, N, W, sfb, sfc, sfh, sfw, swo, swi, k, M,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_N: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Stage 1. Grid: (B, cdiv(H*W, BLOCK_N), cdiv(Cout, BLOCK_CO)).

    Reads feat[b, :, chunk] (strided) and weight[co block, :], computes the score tile
    [BLOCK_CO, BLOCK_N] in registers and writes each channel's k best (key, position) to
    candidate slots [chunk*k, chunk*k + k) of the (B*Cout, M) buffers.
    """
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    co = tl.program_id(2) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    co_live = co < Cout
    col_live = cols < N
    feat_base = feat_ptr + b.to(tl.int64) * sfb + ((cols // W) * sfh + (cols % W) * sfw)[None, :]
    acc = tl.zeros([BLOCK_CO, BLOCK_N], dtype=tl.float32)
    for ci0 in range(0, Cin, BLOCK_CI):
        ci = ci0 + tl.arange(0, BLOCK_CI)
        ci_live = ci < Cin
        f = tl.load(feat_base + ci[:, None] * sfc, mask=ci_live[:, None] & col_live[None, :], other=0.0)
        w = tl.load(w_ptr + co[:, None] * swo + ci[None, :] * swi,
                    mask=co_live[:, None] & ci_live[None, :], other=0.0)
        acc = tl.dot(w.to(OPERAND_DTYPE).to(DOT_DTYPE), f.to(OPERAND_DTYPE).to(DOT_DTYPE), acc,
                     input_precision=PRECISION)
    live = co_live[:, None] & col_live[None, :]
    keys = tl.where(live, sortable_key(acc), EMPTY_KEY)
    pos = tl.where(live, cols[None, :] + tl.zeros([BLOCK_CO, BLOCK_N], tl.int32), NO_POSITION)
    write_candidates(keys, pos, cand_key_ptr, cand_pos_ptr, b * Cout + co, co_live, chunk * k, M, k)


@triton.jit
def _score_topk_dfeat_kernel(
    ds_ptr, w_ptr, dfeat_ptr, Cout, Cin, N, sdn, swo, swi, sfb, sfc, sfp,
    BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Backward to feat. Grid: (B, cdiv(H*W, BLOCK_N), cdiv(Cin, BLOCK_CI)).

    dfeat[b, ci, p] = sum_co weight[co, ci] * dscore[b, co, p]: reads the sparse-in-content
    dscore (B, Cout, rows of sdn >= H*W) that scatter_rows built and the weight (through strides swo, swi),
    both in the operand dtype already (no tile converted in registers on its way to the dot: half the bytes
    of a float32 dscore in 16-bit); writes dfeat through its strides (image, channel, position: feat's memory
    format, NCHW or NHWC, so that the block before gets its gradient as it laid out its output). Rows of a
    multiple of 16 positions start 16-byte aligned, so that 16-bit dscore tiles load as asynchronous copies
    and sm_90's wgmma stays in flight (with rows of H*W, unaligned in general, Triton copies them through
    registers and waits on each).
    """
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ci = tl.program_id(2) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    col_live = cols < N
    row_live = cols < sdn  # a row's padding holds zeros: masked by the row, its loads stay whole vectors
    ci_live = ci < Cin
    acc = tl.zeros([BLOCK_CI, BLOCK_N], dtype=tl.float32)
    for co0 in range(0, Cout, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        co_live = co < Cout
        ds = tl.load(ds_ptr + (b.to(tl.int64) * Cout + co[:, None]) * sdn + cols[None, :],
                     mask=co_live[:, None] & row_live[None, :], other=0.0)
        wt = tl.load(w_ptr + co[None, :] * swo + ci[:, None] * swi,
                     mask=ci_live[:, None] & co_live[None, :], other=0.0)
        acc = tl.dot(wt.to(DOT_DTYPE), ds.to(DOT_DTYPE), acc, input_precision=PRECISION)
    tl.store(dfeat_ptr + b.to(tl.int64) * sfb + ci[:, None] * sfc + cols[None, :] * sfp,
             acc.to(dfeat_ptr.dtype.element_ty), mask=ci_live[:, None] & col_live[None, :])


@triton.jit
def _score_topk_dweight_kernel(
    grad_ptr, idx_ptr, keep_ptr, feat_ptr, dw_ptr,
    B, Cout, Cin, W, sfb, sfc, sfh, sfw, k, scale,
    BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward to weight. Grid: (Cout, cdiv(Cin, BLOCK_CI)).

    dweight[co, ci] = sum over b and rank r of grad[b, co, r] * keep * scale *
    feat[b, ci, idx[b, co, r]]: gathers feat only at the selected positions, sums in a fixed
    order (deterministic, no atomics) and writes the (Cout, Cin) weight gradient.
    """
    co = tl.program_id(0)
    ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ranks = tl.arange(0, BLOCK_K)
    ci_live = ci < Cin
    rank_live = ranks < k
    acc = tl.zeros([BLOCK_CI], dtype=tl.float32)
    for b in range(0, B):
        b = tl.cast(b, tl.int64)
        at = (b * Cout + co) * k + ranks
        g = tl.load(grad_ptr + at, mask=rank_live, other=0.0).to(tl.float32)
        g = tl.where(tl.load(keep_ptr + at, mask=rank_live, other=0) != 0, g * scale, 0.0)
        pos = tl.load(idx_ptr + at, mask=rank_live, other=0)
        f = tl.load(feat_ptr + b * sfb + ci[:, None] * sfc + ((pos // W) * sfh + (pos % W) * sfw)[None, :],
                    mask=ci_live[:, None] & rank_live[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(f * g[None, :], axis=1)
    tl.store(dw_ptr + co * Cin + ci, acc.to(dw_ptr.dtype.element_ty), mask=ci_live)


@on_input_device
def _score_topk(feat: torch.Tensor, weight: torch.Tensor, k: int, seed: torch.Tensor, pmin: float,
                pmax: float, apply_drop: bool, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Cin, H, W = feat.shape
    Cout, N = weight.shape[0], H * W
    tiles = launch_config("score_topk_chunk", feat.device, feat.dtype, precision, BLOCK_N=N, BLOCK_CO=Cout)
    n_chunks = cdiv(N, tiles["BLOCK_N"])
    M = n_chunks * k
    cand_key = torch.empty((B * Cout, M), dtype=torch.int32, device=feat.device)
    cand_pos = torch.empty((B * Cout, M), dtype=torch.int32, device=feat.device)
    if B:
        launch(_score_topk_chunk_kernel, (B, n_chunks, cdiv(Cout, tiles["BLOCK_CO"])),
               feat, weight, cand_key, cand_pos, Cout, Cin, N, W, *feat.stride(), weight.stride(0), weight.stride(1),
               k, M, **tiles, **dot_args(feat.dtype, precision))
    out = torch.empty((B, Cout, k), dtype=feat.dtype, device=feat.device)
    idx, keep = merge_candidates(cand_key, cand_pos, out, k, seed=seed,
                                 drop=(pmin, pmax) if apply_drop else None)
    return out, idx.view(B, Cout, k), keep.view(B, Cout, k)


_score_topk_op = torch.library.custom_op("lfm::score_topk", _score_topk, mutates_args=())


@_score_topk_op.register_fake
def _(feat, weight, k, seed, pmin, pmax, apply_drop, precision):
    B, Cout = feat.shape[0], weight.shape[0]
    return (feat.new_empty((B, Cout, k)), feat.new_empty((B, Cout, k), dtype=torch.int64),
            feat.new_empty((B, Cout, k), dtype=torch.uint8))


@on_input_device
def _score_topk_backward(grad: torch.Tensor, feat: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor,
                         keep: torch.Tensor, scale: float, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    B, Cin, H, W = feat.shape
    Cout, N = weight.shape[0], H * W
    grad, idx, keep = grad.contiguous(), idx.contiguous(), keep.contiguous()
    # Both GEMM operands in feat's dtype (the kernel would round them to it): dscore rounded once as it is
    # scattered, the weight packed as (Cin, Cout).
    dscore = scatter_rows(grad.to(feat.dtype), idx, keep, scale, [B, Cout, cdiv(N, 16) * 16])
    operand = packed_weight(weight, feat.dtype, SCORE_OPERAND)
    dfeat = _dfeat_like(feat)
    tiles = launch_config("score_topk_dfeat", feat.device, feat.dtype, precision, BLOCK_N=N, BLOCK_CI=Cin,
                          BLOCK_CO=Cout)
    if B:
        launch(_score_topk_dfeat_kernel, (B, cdiv(N, tiles["BLOCK_N"]), cdiv(Cin, tiles["BLOCK_CI"])),
               dscore, operand, dfeat, Cout, Cin, N, dscore.shape[-1], operand.stride(0), operand.stride(1),
               dfeat.stride(0), dfeat.stride(1), dfeat.stride(3), **tiles, **gemm_dot_args(feat.dtype, precision))
    dweight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    tiles = launch_config("score_topk_dweight", feat.device, BLOCK_CI=Cin)
    launch(_score_topk_dweight_kernel, (Cout, cdiv(Cin, tiles["BLOCK_CI"])),
           grad, idx, keep, feat, dweight, B, Cout, Cin, W, *feat.stride(), idx.shape[-1], scale,
           BLOCK_K=triton.next_power_of_2(idx.shape[-1]), **tiles)
    return dfeat, dweight


_score_topk_backward_op = torch.library.custom_op("lfm::score_topk_backward", _score_topk_backward, mutates_args=())


@_score_topk_backward_op.register_fake
def _(grad, feat, weight, idx, keep, scale, precision):
    return _dfeat_like(feat), torch.empty_like(weight)


def _dfeat_like(feat: torch.Tensor) -> torch.Tensor:
    """The feature gradient's buffer: channels_last where feat is (the SNet blocks' NHWC output, whose
    backward reads its gradient so), else contiguous."""
    channels_last = feat.is_contiguous(memory_format=torch.channels_last) and not feat.is_contiguous()
    return torch.empty(feat.shape, dtype=feat.dtype, device=feat.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    feat, weight, k, seed, pmin, pmax, apply_drop, precision = inputs
    _, idx, keep = output
    ctx.save_for_backward(feat, weight, idx, keep)
    ctx.scale = dropout_scale(pmin, pmax) if apply_drop else 1.0
    ctx.precision = precision
    ctx.mark_non_differentiable(idx, keep)


def _backward(ctx, grad, _grad_idx, _grad_keep):
    feat, weight, idx, keep = ctx.saved_tensors
    dfeat, dweight = call_op(torch.ops.lfm.score_topk_backward, _score_topk_backward, grad, feat, weight, idx, keep,
                             ctx.scale, ctx.precision)
    return dfeat, dweight, None, None, None, None, None, None


_score_topk_autograd = register_autograd(_score_topk_op, _score_topk, _backward, _setup_context)
_score_topk_op.register_vmap(batch_folding_vmap(_score_topk_op))


def score_topk(feat, weight, k, *, drop=None, training=False, return_indices=False, input_precision=None,
               backend=None):
    """topk_pool(conv2d(feat, weight), k, ...) for a bias-free 1x1 weight; see the module docstring.
    Float32 scores use TF32 when torch allows it for cuDNN convolutions (input_precision=None, as
    F.conv2d would), or as input_precision ("tf32" or "ieee") says."""
    check_float_tensor("feat", feat, 4)
    check_float_tensor("weight", weight, 4)
    check_same_device(feat=feat, weight=weight)
    if weight.shape[1] != feat.shape[1] or weight.shape[2:] != (1, 1) or 0 in weight.shape[:2]:
        raise ValueError(f"weight must have shape (Cout, {feat.shape[1]}, 1, 1) with Cout >= 1 for feat with "
                         f"{feat.shape[1]} channels (at least 1), got {tuple(weight.shape)}")
    check_conv_dtypes(feat=feat, weight=weight)
    check_k(k, feat.shape[2] * feat.shape[3])
    drop = check_drop(drop)
    check_precision(input_precision)
    trains = training or (torch.is_grad_enabled() and (feat.requires_grad or weight.requires_grad))
    if resolve_backend(backend, feat, "score_topk", trains) == "torch":  # topk_pool's torch path (fast without grads)
        return topk_pool(F.conv2d(feat, weight), k, drop=drop, training=training, return_indices=return_indices,
                         backend="torch")
    feat, _ = conv_input("feat", feat)
    check_kernel_dtype("weight", weight)
    check_kernel_k(k)
    apply_drop = drop is not None and bool(training)
    seed = draw_seed(feat.device) if apply_drop else torch.zeros(2, dtype=torch.int64, device=feat.device)
    pmin, pmax = drop if apply_drop else (0.0, 0.0)
    values, idx, _ = _score_topk_autograd(feat, weight, k, seed, pmin, pmax, apply_drop,
                                          resolve_precision(input_precision))
    return (values, idx) if return_indices else values
