"""SNet's head fused: block 4 (2x2 conv -> BatchNorm -> ReLU) -> 1x1 scoring conv -> Top-K pooling.

snet_head(x, ...) == score_topk(snet_block(x, ..., pool=False), score_weight, k): LFM's block 4, its
1x1 scoring conv (covn1_1) and Top-K. In inference on the triton backend the block-4 map never reaches
memory: two GEMMs back to back per tile of positions, the block-4 conv (snet_block's conv_tile, C4
channels a block at a time) and the scoring GEMM on its normalized, ReLU'd tile, then per score channel
the tile's k best as Top-K candidates (selection's chunk stage), merged per row by selection's merge.
Elsewhere (training, gradients, the torch backend) it is the composition of the two ops. Kernels:
  _snet_head_candidates_kernel  block 4 + BatchNorm + ReLU + scoring + per-tile Top-K candidates
  _snet_head_partial_kernel     the same up to the scores, over one slice of the C4 channels: partial
                                scores, summed by selection's chunk kernel (small batches, to fill the GPU)
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .backend import call_op, on_input_device, resolve_backend
from .checks import check_float_tensor, check_k, check_kernel_k, flag_signature, once_per_signature, tensors_signature
from .configs import cdiv, fill_target, halve_to_fill, launch, launch_config, policy_state
from .conv2x2 import conv_tile, dot_operand, packed_weight
from .precision import check_conv_dtypes, conv_input, gemm_dot_args, resolve_precision
from .randomness import check_drop
from .score_topk import SCORE_OPERAND, score_topk
from .selection import EMPTY_KEY, NO_POSITION, merge_candidates, select_chunks, sortable_key, write_candidates
from .snet_block import (
    _check_block,
    batchnorm_affine,
    block_signature,
    conv_bias_or_zeros,
    needs_grad,
    nhwc,
    relu,
    snet_block,
    snet_block_reference,
)
from .topk_pool import topk_pool_reference


def snet_head_reference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, score_weight, k, *,
                        eps=1e-5, drop=None, training=False, return_indices=False):
    feat = snet_block_reference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=eps,
                                training=training, pool=False)
    return topk_pool_reference(F.conv2d(feat, score_weight), k, drop=drop, training=training,
                               return_indices=return_indices)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _head_scores(x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, ws_ptr, eps, b, p, live, cs, cs_live,
                 c4_start, c4_stop, Cin, C4, CS, H, W, BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr,
                 BLOCK_C4: tl.constexpr, BLOCK_CS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_P, BLOCK_CS] float32 scores at conv positions p of image b from block-4 channels [c4_start,
    c4_stop): per C4 block, the conv tile, BatchNorm (running statistics) and ReLU, then
    score += feat @ score_weight[c4 block, cs], so the C4-channel map stays on chip."""
    Wc = W - 1
    r = p // Wc
    c = p % Wc
    operand = ws_ptr.dtype.element_ty
    score = tl.zeros([BLOCK_P, BLOCK_CS], dtype=tl.float32)
    for c40 in range(c4_start, c4_stop, BLOCK_C4):
        c4 = c40 + tl.arange(0, BLOCK_C4)
        c4_live = c4 < c4_stop
        acc = conv_tile(x_ptr, w_ptr, b, r, c, live, c4, c4_live, Cin, H, W, C4, False, BLOCK_P, BLOCK_CI, BLOCK_C4,
                        DOT_DTYPE, PRECISION)
        scale, shift = batchnorm_affine(bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, c4, c4_live)
        feat = relu(acc * scale + shift)
        ws = tl.load(ws_ptr + c4[:, None] * CS + cs[None, :], mask=c4_live[:, None] & cs_live[None, :], other=0.0)
        score = tl.dot(dot_operand(feat, operand, DOT_DTYPE), dot_operand(ws, operand, DOT_DTYPE), score,
                       input_precision=PRECISION)
    return score


@triton.jit
def _snet_head_candidates_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, ws_ptr, cand_key_ptr, cand_pos_ptr, eps,
    Cin, C4, CS, H, W, k,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_C4: tl.constexpr, BLOCK_CS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Block 4 + BatchNorm + ReLU + scoring + Top-K candidates. Grid: (B, cdiv(Hc*Wc, BLOCK_P), cdiv(CS, BLOCK_CS)).

    Reads BLOCK_P positions' 2x2 neighbourhoods of the NHWC block-3 map x (B, H, W, Cin), the packed block-4
    weight and the packed (C4, CS) score weight; writes each score channel's k best (key, position) of
    the tile to candidate slots [chunk*k, chunk*k + k) of the int32 (B*CS, chunks*k) buffers. More than
    BLOCK_CS score channels take more programs (each recomputes the conv).
    """
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    live = p < (H - 1) * (W - 1)
    cs = tl.program_id(2) * BLOCK_CS + tl.arange(0, BLOCK_CS)
    cs_live = cs < CS
    score = _head_scores(x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, ws_ptr, eps, b, p, live, cs,
                         cs_live, 0, C4, Cin, C4, CS, H, W, BLOCK_P, BLOCK_CI, BLOCK_C4, BLOCK_CS, DOT_DTYPE, PRECISION)
    ok = live[:, None] & cs_live[None, :]
    keys = tl.trans(tl.where(ok, sortable_key(score), EMPTY_KEY))
    pos = tl.trans(tl.where(ok, p[:, None] + tl.zeros([BLOCK_P, BLOCK_CS], tl.int32), NO_POSITION))
    write_candidates(keys, pos, cand_key_ptr, cand_pos_ptr, b * CS + cs, cs_live, chunk * k, tl.num_programs(1) * k, k)


@triton.jit
def _snet_head_partial_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, ws_ptr, part_ptr, eps,
    B, Cin, C4, CS, H, W, c4_per_split,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_C4: tl.constexpr, BLOCK_CS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial scores of one C4 slice. Grid: (n_splits * B, cdiv(Hc*Wc, BLOCK_P), cdiv(CS, BLOCK_CS)).

    Program split s takes block-4 channels [s * c4_per_split, (s + 1) * c4_per_split) and writes its float32
    scores to part[s, b, cs, p] of the (n_splits, B, CS, Hc*Wc) buffer; selection's chunk kernel sums the
    slices in split order (the score is linear in the channels; BatchNorm and ReLU act per channel).
    """
    split = tl.program_id(0) // B
    b = tl.program_id(0) % B
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n_pos = (H - 1) * (W - 1)
    live = p < n_pos
    cs = tl.program_id(2) * BLOCK_CS + tl.arange(0, BLOCK_CS)
    cs_live = cs < CS
    start = split * c4_per_split
    score = _head_scores(x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, ws_ptr, eps, b, p, live, cs,
                         cs_live, start, tl.minimum(start + c4_per_split, C4), Cin, C4, CS, H, W, BLOCK_P, BLOCK_CI,
                         BLOCK_C4, BLOCK_CS, DOT_DTYPE, PRECISION)
    at = ((split * B + b).to(tl.int64) * CS + cs[None, :]) * n_pos + p[:, None]
    tl.store(part_ptr + at, score, mask=live[:, None] & cs_live[None, :])


# ---------------------------------------------------------------------------------------------
# Op
# ---------------------------------------------------------------------------------------------
def _head_splits(tiles, programs, C4, target):
    """(n_splits, c4_per_split): how the head splits C4 so that every SM has a program at small batch (at
    most one split per channel block; BLOCK_C4 halves, down to 16, where that is not enough). One split,
    the fused path, once the batch fills the GPU."""
    def splits(t):
        blocks = cdiv(C4, t["BLOCK_C4"])
        per_split = max(1, blocks // cdiv(target, max(programs, 1)))
        return cdiv(blocks, per_split), per_split * t["BLOCK_C4"]

    halve_to_fill(tiles, "BLOCK_C4", lambda t: programs * splits(t)[0], target)
    return splits(tiles)


@functools.lru_cache(maxsize=1024)
def _head_plan(shape: torch.Size, C4: int, CS: int, compute_dtype: torch.dtype, precision: str, device: torch.device,
               state: tuple):
    """(tiles and dot constexprs, chunks of positions, score-channel blocks, C4 splits, C4 channels per split) of
    an inference launch on x of `shape`: memoized per signature, state being configs.policy_state(device)."""
    B, Cin, H, W = shape
    tiles = launch_config("snet_head", device, compute_dtype, precision, BLOCK_CI=Cin, BLOCK_C4=C4, BLOCK_CS=CS)
    n_chunks = cdiv((H - 1) * (W - 1), tiles["BLOCK_P"])
    cs_blocks = cdiv(CS, tiles["BLOCK_CS"])
    n_splits, c4_per_split = _head_splits(tiles, B * n_chunks * cs_blocks, C4, fill_target(device))
    return dict(**tiles, **gemm_dot_args(compute_dtype, precision)), n_chunks, cs_blocks, n_splits, c4_per_split


@on_input_device
def _snet_head_eval(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                    beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                    score_weight: torch.Tensor, k: int, precision: str, compute_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference of block 4 (running statistics) + ReLU + 1x1 scoring + Top-K: (values, positions)."""
    B, Cin, H, W = x.shape
    C4, CS, Hc, Wc = weight.shape[0], score_weight.shape[0], H - 1, W - 1
    meta, n_chunks, cs_blocks, n_splits, c4_per_split = _head_plan(x.shape, C4, CS, compute_dtype, precision,
                                                                   x.device, policy_state(x.device))
    args = (nhwc(x), packed_weight(weight, compute_dtype), bias, gamma, beta, mean, var,
            packed_weight(score_weight, compute_dtype, SCORE_OPERAND))
    if n_splits > 1:
        part = torch.empty((n_splits, B, CS, Hc, Wc), dtype=torch.float32, device=x.device)
        launch(_snet_head_partial_kernel, (n_splits * B, n_chunks, cs_blocks), *args, part, eps, B, Cin, C4, CS, H, W,
               c4_per_split, **meta)
        cand_key, cand_pos = select_chunks(part, k)
    else:
        cand_key = torch.empty((B * CS, n_chunks * k), dtype=torch.int32, device=x.device)
        cand_pos = torch.empty_like(cand_key)
        if B:
            launch(_snet_head_candidates_kernel, (B, n_chunks, cs_blocks), *args, cand_key, cand_pos, eps, Cin, C4, CS,
                   H, W, k, **meta)
    out = torch.empty((B, CS, k), dtype=compute_dtype, device=x.device)
    idx, _ = merge_candidates(cand_key, cand_pos, out, k)
    return out, idx.view(B, CS, k)


_snet_head_eval_op = torch.library.custom_op("lfm::snet_head_eval", _snet_head_eval, mutates_args=())


@_snet_head_eval_op.register_fake
def _(x, weight, bias, gamma, beta, mean, var, eps, score_weight, k, precision, compute_dtype):
    B, CS = x.shape[0], score_weight.shape[0]
    return x.new_empty((B, CS, k), dtype=compute_dtype), x.new_empty((B, CS, k), dtype=torch.int64)


def _head_signature(*args) -> tuple:
    """What _check_head reads of its arguments (checks.once_per_signature)."""
    *block, score_weight, k = args
    return *block_signature(*block[:-1], False, block[-1]), *tensors_signature(score_weight), flag_signature(k)


def _check_head(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, input_precision,
                score_weight, k):
    """snet_head's checks: check_block's (block 4 does not pool), then those of the scoring and k."""
    _check_block(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, False,
                 input_precision)
    check_float_tensor("score_weight", score_weight, 4)
    if score_weight.shape[1:] != (conv_weight.shape[0], 1, 1) or score_weight.shape[0] == 0:
        raise ValueError(f"score_weight must have shape (Cs, {conv_weight.shape[0]}, 1, 1) with Cs >= 1, got "
                         f"{tuple(score_weight.shape)}")
    check_conv_dtypes(x=x, score_weight=score_weight)  # as score_topk in the composition
    check_k(k, (x.shape[2] - 1) * (x.shape[3] - 1))


def snet_head(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, score_weight, k, *, eps=1e-5,
              momentum=0.1, drop=None, training=False, return_indices=False, input_precision=None, backend=None):
    """score_topk(snet_block(x, ..., pool=False), score_weight, k, ...): LFM's block 4, 1x1 scoring and
    Top-K; see the module docstring. The scoring uses the block's precision either way, so eval and
    training pick the same Top-K."""
    once_per_signature(_check_head, _head_signature, x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
                       running_var, training, input_precision, score_weight, k)
    drop = check_drop(drop)
    inference = not training and not needs_grad(x, conv_weight, conv_bias, bn_weight, bn_bias, score_weight)
    if not (inference and resolve_backend(backend, x, "snet_head") == "triton"):
        # The composition; on the torch backend in inference both ops take their torch modules' fast paths.
        feat = snet_block(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=eps,
                          momentum=momentum, training=training, pool=False, input_precision=input_precision,
                          backend=backend)
        return score_topk(feat, score_weight, k, drop=drop, training=training, return_indices=return_indices,
                          input_precision=input_precision, backend=backend)
    check_kernel_k(k)
    x, compute_dtype = conv_input("x", x)
    values, idx = call_op(torch.ops.lfm.snet_head_eval, _snet_head_eval, x, conv_weight,
                          conv_bias_or_zeros(conv_weight, conv_bias), bn_weight, bn_bias, running_mean, running_var,
                          eps, score_weight, k, resolve_precision(input_precision), compute_dtype)
    return (values, idx) if return_indices else values
