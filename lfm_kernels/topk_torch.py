"""The torch backend of topk_pool (and of score_topk, which composes it): Top-K without a full sort.

Top-K by torch.topk for the k-th value, then an exact selection keeping our tie rule (lower position first
among equal values, NaN largest) without sorting whole rows and without data-dependent shapes, so
torch.compile and torch.export take it as it is; in training the positions it picks gather the values, so
the gradient goes to the same positions as the reference's.
"""
import torch


def topk_select(flat, k: int):
    """(values, positions) of the k largest along the last dim, descending: exactly
    topk_select_reference (ties to the lower position, NaN largest), without a full sort.

    torch.topk gives the k-th largest value t (the multiset of the k largest values is unique even
    when torch.topk's order among ties is not). The selection is every position above t and, of those
    equal to t, the first ones in position order; the selected positions are gathered in ascending
    order, and a stable descending sort of their k values puts them in rank order."""
    t = torch.topk(flat, k, dim=-1).values[..., -1:]
    nan, t_nan = flat != flat, t != t
    above = (flat > t) | (nan & ~t_nan)
    at = (flat == t) | (nan & t_nan)
    # Running counts in int32: cumsum of a bool tensor goes through int64 and costs several times more.
    tie_rank = at.to(torch.int32).cumsum(-1, dtype=torch.int32)
    take = above | (at & (tie_rank <= k - above.sum(-1, keepdim=True, dtype=torch.int32)))
    # Slot of each selected position (0..k-1 in position order); the others all go to a spare slot k.
    slot = torch.where(take, take.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1, k).long()
    positions = torch.arange(flat.shape[-1], device=flat.device).expand_as(flat)
    idx = torch.zeros((*flat.shape[:-1], k + 1), dtype=torch.int64, device=flat.device)
    idx = idx.scatter(-1, slot, positions)[..., :k]  # out of place, so that torch.func.vmap can batch it
    values = flat.gather(-1, idx)
    if k <= RANK_MATRIX_MAX_K:
        order = _rank_order(values)
    else:
        order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(-1, order), idx.gather(-1, order)


# Up to this k the final ordering compares all k x k pairs instead of sorting: exact, cheap for LFM's
# K = 16, and made of ops that ONNX has (ONNX has no stable sort).
RANK_MATRIX_MAX_K = 64


def _rank_order(values):
    """The permutation that sorts each row of `values` descending, stably (NaN largest), as
    torch.sort(values, descending=True, stable=True).indices: the rank of value i is the number of
    values above it plus the number of equal ones before it."""
    k = values.shape[-1]
    v, u = values.unsqueeze(-1), values.unsqueeze(-2)  # [..., i, j] compares value i with value j
    v_nan, u_nan = v != v, u != u
    above = (u > v) | (u_nan & ~v_nan)
    equal = (u == v) | (u_nan & v_nan)
    before = torch.ones(k, k, dtype=torch.bool, device=values.device).tril(-1)
    rank = (above | (equal & before)).sum(-1)
    positions = torch.arange(k, device=values.device).expand_as(rank)
    return torch.empty_like(rank).scatter(-1, rank, positions)


def topk_pool_inference(x, k: int, *, return_indices=False):
    """topk_pool_reference(x, k) in eval (no dropout)."""
    values, idx = topk_select(x.flatten(2), k)
    return (values, idx) if return_indices else values


def topk_pool_train(x, k: int, dropout=None):
    """topk_pool_reference(x, k, drop=..., training=True) with the positions from topk_select:
    (values, positions); `dropout(values)` is applied to the values when given."""
    flat = x.flatten(2)
    with torch.no_grad():
        _, idx = topk_select(flat, k)
    values = flat.gather(-1, idx)
    return (values if dropout is None else dropout(values)), idx
