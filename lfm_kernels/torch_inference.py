"""The torch backend's inference path on CPU: what snet_block and topk_pool (and so snet_head and
score_topk, which compose them) run on the torch backend when nothing is trained and no gradient is
needed.

Same answers as the references (`*_reference`, kept as they are for the tests), computed faster:
  - BatchNorm folded into the conv weight and bias on every call. Nothing is cached, so no update of
    the parameters (an optimizer step, a `.data` write) can leave a stale copy; folding costs under 1%
    of a block.
  - channels_last activations and folded weights, which oneDNN convolves about twice as fast as NCHW.
  - pool blocks by cache-sized chunks (CHUNK_BYTES of conv output: a few images, or a band of rows of
    one): the pre-pool map is pooled while it is in cache instead of going to memory and back, which
    alone doubles the speed at batch 8 on 2 cores. Under torch.compile and torch.export the whole
    batch goes in one call (one graph for any batch size), pooled by F.max_pool2d in an export.
  - max-pool without indices (F.max_pool2d computes them even when nothing needs them), before an
    in-place ReLU. oneDNN's fused conv+ReLU is not used: its ReLU turns NaN into 0, and our ops keep
    NaN (a broken checkpoint must score NaN, not a number).
  - Top-K by torch.topk for the k-th value, then an exact selection keeping our tie rule (lower
    position first among equal values, NaN largest) without sorting whole rows and without
    data-dependent shapes, so torch.compile and torch.export take it as it is.
"""
import torch
import torch.nn.functional as F


def fold_batchnorm(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps):
    """(weight, bias) with conv(x, weight, bias) == batchnorm(conv(x, conv_weight, conv_bias)) in eval."""
    scale = bn_weight / torch.sqrt(running_var + eps)
    bias = bn_bias - running_mean * scale
    if conv_bias is not None:
        bias = bias + conv_bias * scale
    # In channels_last, the layout oneDNN takes with channels_last activations (else each conv call, one
    # per chunk, would copy the weight into it).
    return (conv_weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last), bias


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


# Bytes of pre-pool map one conv call writes before the pool reads it back. Kept small enough to stay
# in cache: a whole block-1 map at batch 8 and 256x256 is 133 MB, which the conv writes to memory and
# the pool reads back, so pool blocks run a few images, or a band of rows of one image, at a time.
CHUNK_BYTES = 4 << 20


def snet_block_inference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, *, eps=1e-5,
                         pool=True, npr=False):
    """snet_block_reference(..., training=False) with BatchNorm folded, in channels_last, pooled by
    cache-sized chunks of images or rows."""
    if npr:
        x = npr_residual_inference(x)
    weight, bias = fold_batchnorm(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)
    x = x.contiguous(memory_format=torch.channels_last)
    if not pool:
        return F.conv2d(x, weight, bias).relu_()
    if torch.compiler.is_exporting():
        # One graph for any batch; F.max_pool2d becomes ONNX's MaxPool, which ONNX Runtime runs in its
        # blocked layout next to the convs (four strided slices there cost more than all the convs).
        return F.max_pool2d(F.conv2d(x, weight, bias), 2).relu_()
    if torch.compiler.is_compiling() or not x.shape[0]:  # one graph for any batch (Inductor fuses the pool)
        return max_pool_2x2(F.conv2d(x, weight, bias)).relu_()
    # Pool first: max-pool and ReLU commute (both monotonic, both keep NaN), so ReLU touches a quarter.
    B, _, H, W = x.shape
    Hp = (H - 1) // 2
    row_bytes = 2 * (W - 1) * weight.shape[0] * x.element_size()  # conv output behind one pooled row
    images = max(1, CHUNK_BYTES // (row_bytes * Hp))
    rows = Hp if images > 1 else max(1, CHUNK_BYTES // row_bytes)
    out = None
    for i in range(0, B, images):
        for r in range(0, Hp, rows):
            r_end = min(r + rows, Hp)
            # Conv rows [2r, 2 r_end) read input rows [2r, 2 r_end + 1): a slice of one image, or whole
            # images, is still a dense channels_last tensor, so oneDNN reads it in place.
            y = F.conv2d(x[i:i + images, :, 2 * r:2 * r_end + 1], weight, bias)
            if out is None:  # the conv's dtype (autocast may change it)
                out = torch.empty((B, y.shape[1], Hp, (W - 1) // 2), dtype=y.dtype, device=y.device,
                                  memory_format=torch.channels_last)
            max_pool_2x2(y, out=out[i:i + images, :, r:r_end]).relu_()
    return out


def max_pool_2x2(y, out=None):
    """F.max_pool2d(y, 2) (floor mode, NaN kept) as the maximum of the four strided phases of the
    windows: no indices, and in channels_last each phase reads whole channel vectors."""
    h, w = y.shape[-2] // 2 * 2, y.shape[-1] // 2 * 2
    top = torch.maximum(y[..., 0:h:2, 0:w:2], y[..., 0:h:2, 1:w:2])
    bottom = torch.maximum(y[..., 1:h:2, 0:w:2], y[..., 1:h:2, 1:w:2])
    return torch.maximum(top, bottom) if out is None else torch.maximum(top, bottom, out=out)


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

