"""Top-K pooling with rank-based linear dropout (the "TKP" + "RBLD" of LFM).

For each (b, c) of a (B, C, H, W) map: the k largest of the H*W values, sorted descending,
shape (B, C, k). Ties go to the lower flat position; NaN ranks as the largest value (as in
torch.topk). With drop=(pmin, pmax) in training, the value at rank r (0 = largest) is zeroed
with probability pmax - (pmax - pmin) * r / (k - 1) and survivors are scaled by 1 / (1 - mean p);
as in F.dropout, out = value * keep * scale, so a dropped inf or NaN gives NaN.

The kernels are selection.py's: its chunk kernel selects each chunk's k best as candidates and
its merge kernel picks the k best candidates of each row and applies the dropout; the backward is
lfm::scatter_rows. The triton backend takes k <= MAX_KERNEL_K.
"""
import torch

from .backend import batch_folding_vmap, on_input_device, register_autograd, resolve_backend
from .checks import check_float_tensor, check_k, check_kernel_k
from .precision import check_kernel_dtype
from .randomness import check_drop, draw_seed, dropout_scale, rank_drop_probs
from .selection import merge_candidates, scatter_rows, select_chunks
from .topk_torch import topk_pool_inference, topk_pool_train


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def topk_select_reference(flat: torch.Tensor, k: int):
    """The k largest along the last dim, descending; ties to the lower position, NaN largest."""
    values, idx = torch.sort(flat, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def rank_dropout_reference(values: torch.Tensor, pmin: float, pmax: float, keep=None):
    """Rank-based linear dropout of (B, C, k) values sorted descending; returns (out, keep)."""
    if keep is None:
        probs = rank_drop_probs(values.shape[-1], pmin, pmax, values.device)
        keep = torch.rand(values.shape, device=values.device) >= probs
    return values * keep * dropout_scale(pmin, pmax), keep


def topk_pool_reference(x, k, *, drop=None, training=False, return_indices=False):
    values, idx = topk_select_reference(x.flatten(2), k)
    if drop is not None and training:
        values, _ = rank_dropout_reference(values, *drop)
    return (values, idx) if return_indices else values


# ---------------------------------------------------------------------------------------------
# Op
# ---------------------------------------------------------------------------------------------
@on_input_device
def _topk_pool(x: torch.Tensor, k: int, seed: torch.Tensor, pmin: float, pmax: float,
               apply_drop: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C = x.shape[:2]
    out = torch.empty((B, C, k), dtype=x.dtype, device=x.device)
    cand_key, cand_pos = select_chunks(x, k)
    idx, keep = merge_candidates(cand_key, cand_pos, out, k, seed=seed,
                                 drop=(pmin, pmax) if apply_drop else None)
    return out, idx.view(B, C, k), keep.view(B, C, k)


_topk_pool_op = torch.library.custom_op("lfm::topk_pool", _topk_pool, mutates_args=())


@_topk_pool_op.register_fake
def _(x, k, seed, pmin, pmax, apply_drop):
    B, C = x.shape[:2]
    return (x.new_empty((B, C, k)), x.new_empty((B, C, k), dtype=torch.int64),
            x.new_empty((B, C, k), dtype=torch.uint8))


def _setup_context(ctx, inputs, output):
    x, k, seed, pmin, pmax, apply_drop = inputs
    _, idx, keep = output
    ctx.save_for_backward(idx, keep)
    ctx.shape = list(x.shape)
    ctx.scale = dropout_scale(pmin, pmax) if apply_drop else 1.0
    ctx.mark_non_differentiable(idx, keep)


def _backward(ctx, grad, _grad_idx, _grad_keep):
    idx, keep = ctx.saved_tensors
    return scatter_rows(grad, idx, keep, ctx.scale, ctx.shape), None, None, None, None, None


_topk_pool_autograd = register_autograd(_topk_pool_op, _topk_pool, _backward, _setup_context)
_topk_pool_op.register_vmap(batch_folding_vmap(_topk_pool_op))


def topk_pool(x, k, *, drop=None, training=False, return_indices=False, backend=None):
    """Per-channel Top-K of a (B, C, H, W) map; see the module docstring."""
    check_float_tensor("x", x, 4)
    check_k(k, x.shape[2] * x.shape[3])
    drop = check_drop(drop)
    trains = (drop is not None and training) or (torch.is_grad_enabled() and x.requires_grad)
    if resolve_backend(backend, x, "topk_pool", trains) == "torch":
        if not trains:
            return topk_pool_inference(x, k, return_indices=return_indices)
        dropout = (lambda values: rank_dropout_reference(values, *drop)[0]) if drop is not None and training else None
        values, idx = topk_pool_train(x, k, dropout)
        return (values, idx) if return_indices else values
    check_kernel_dtype("x", x)
    check_kernel_k(k)
    apply_drop = drop is not None and bool(training)
    seed = draw_seed(x.device) if apply_drop else torch.zeros(2, dtype=torch.int64, device=x.device)
    pmin, pmax = drop if apply_drop else (0.0, 0.0)
    values, idx, _ = _topk_pool_autograd(x, k, seed, pmin, pmax, apply_drop)
    return (values, idx) if return_indices else values
