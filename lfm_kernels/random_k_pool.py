"""Random-K sampling (the "RKS" auxiliary branch of LFM).

For each (b, c) of a (B, C, H, W) map: the values at k distinct, uniformly random positions,
sorted ascending (as the authors released it; NaN last, ties by position), shape (B, C, k).
Each position gets a Philox integer keyed on (seed, offset, b, c, position); the k largest keys
are a uniform k-subset. Stage 1 is topk_pool's chunk kernel on those keys; stage 2 below.
"""
import torch
import triton
import triton.language as tl

from .backend import batch_folding_vmap, on_input_device, register_autograd, resolve_backend
from .checks import check_float_tensor, check_k, check_kernel_k
from .configs import cdiv, launch
from .precision import check_kernel_dtype
from .randomness import draw_seed
from .selection import (
    EMPTY_KEY,
    NO_POSITION,
    key_to_value,
    launch_options,
    load_candidates,
    pop_max,
    reduce_candidates,
    rows_per_program,
    scatter_rows,
    select_chunks,
    sortable_key,
)


def random_k_pool_reference(x, k, *, return_indices=False):
    flat = x.flatten(2)
    idx = torch.rand(flat.shape, device=x.device).topk(k, dim=-1).indices.sort(dim=-1).values
    values, order = torch.sort(flat.gather(-1, idx), dim=-1, stable=True)
    return (values, idx.gather(-1, order)) if return_indices else values


@triton.jit
def _random_k_merge_kernel(
    cand_key_ptr, cand_pos_ptr, x_ptr, out_ptr, idx_ptr,
    n_rows, C, W, sb, sc, sh, sw, M, k,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Stage 2. Grid: (cdiv(B*C, BLOCK_R),).

    Reads each row's M random-key candidates, keeps the k positions with the largest keys,
    gathers x there (through its strides) and writes the values in ascending order with their
    int64 positions, both (B*C, k).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_live = rows < n_rows
    keys, pos = load_candidates(cand_key_ptr, cand_pos_ptr, rows, row_live, 0, M, BLOCK_M)
    lanes = tl.arange(0, BLOCK_K)[None, :]
    chosen = tl.full([BLOCK_R, BLOCK_K], NO_POSITION, tl.int32)
    for r in range(0, k):
        _, where, keys, pos = pop_max(keys, pos)
        chosen = tl.where(lanes == r, where[:, None], chosen)

    # Ascending order = descending order of the bit-inverted keys; NaN goes last.
    valid = row_live[:, None] & (lanes < k)
    b = rows // C
    c = rows % C
    addr = (b.to(tl.int64) * sb + c.to(tl.int64) * sc)[:, None] + (chosen // W) * sh + (chosen % W) * sw
    values = tl.load(x_ptr + addr, mask=valid, other=0.0).to(tl.float32)
    asc = tl.where(values != values, EMPTY_KEY + 1, ~sortable_key(values))
    asc = tl.where(valid, asc, EMPTY_KEY)
    order = tl.where(valid, chosen, NO_POSITION)
    at = rows.to(tl.int64) * k
    for r in range(0, k):
        _, where, asc, order = pop_max(asc, order)
        # The value at its position, exactly (a zero keeps its sign).
        value = key_to_value(tl.max(tl.where(chosen == where[:, None], sortable_key(values), EMPTY_KEY), axis=1))
        tl.store(out_ptr + at + r, value.to(out_ptr.dtype.element_ty), mask=row_live)
        tl.store(idx_ptr + at + r, where.to(tl.int64), mask=row_live)


@on_input_device
def _random_k_pool(x: torch.Tensor, k: int, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    out = torch.empty((B, C, k), dtype=x.dtype, device=x.device)
    idx = torch.empty((B, C, k), dtype=torch.int64, device=x.device)
    cand_key, cand_pos = reduce_candidates(*select_chunks(x, k, seed=seed), k)
    M = cand_key.shape[1]
    block_m = triton.next_power_of_2(M)
    block_r = rows_per_program(block_m)
    if not B * C:
        return out, idx
    launch(
        _random_k_merge_kernel, (cdiv(B * C, block_r),),
        cand_key, cand_pos, x, out, idx, B * C, C, W, *x.stride(), M, k,
        BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_K=triton.next_power_of_2(k), **launch_options(),
    )
    return out, idx


_random_k_pool_op = torch.library.custom_op("lfm::random_k_pool", _random_k_pool, mutates_args=())


@_random_k_pool_op.register_fake
def _(x, k, seed):
    B, C = x.shape[:2]
    return x.new_empty((B, C, k)), x.new_empty((B, C, k), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    x, k, seed = inputs
    ctx.save_for_backward(output[1])
    ctx.shape = list(x.shape)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_idx):
    (idx,) = ctx.saved_tensors
    return scatter_rows(grad, idx, None, 1.0, ctx.shape), None, None


_random_k_pool_autograd = register_autograd(_random_k_pool_op, _random_k_pool, _backward, _setup_context)
_random_k_pool_op.register_vmap(batch_folding_vmap(_random_k_pool_op))


def random_k_pool(x, k, *, return_indices=False, backend=None):
    """Values at k distinct uniform random positions per (b, c), sorted ascending; (B, C, k)."""
    check_float_tensor("x", x, 4)
    check_k(k, x.shape[2] * x.shape[3])
    if resolve_backend(backend, x, "random_k_pool", torch.is_grad_enabled() and x.requires_grad) == "torch":
        return random_k_pool_reference(x, k, return_indices=return_indices)
    check_kernel_dtype("x", x)
    check_kernel_k(k)
    values, idx = _random_k_pool_autograd(x, k, draw_seed(x.device))
    return (values, idx) if return_indices else values
