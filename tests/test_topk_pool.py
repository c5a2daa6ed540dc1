import contextlib
import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from utils import assert_as_accurate, binomial_sigmas, distinct_map, layouts

from lfm_kernels import topk_pool, topk_pool_reference
from lfm_kernels.nn import TopKPool
from lfm_kernels.randomness import rank_drop_probs


@pytest.mark.parametrize("shape,k", [((2, 3, 7, 9), 5), ((1, 2, 30, 30), 16), ((2, 1, 3, 3), 9),
                                     ((1, 2, 70, 71), 16), ((3, 2, 1, 1), 1)])
def test_values_and_indices_match_reference(shape, k):
    x = distinct_map(*shape).requires_grad_()
    values, idx = topk_pool(x, k, return_indices=True, backend="triton")
    ref_values, ref_idx = topk_pool_reference(x.double(), k, return_indices=True)
    assert values.shape == (shape[0], shape[1], k) and idx.dtype == torch.int64
    # A selection copies values and routes gradients: exact, against the float64 reference.
    assert torch.equal(values.double(), ref_values)
    assert torch.equal(idx, ref_idx)
    grad = torch.randn(values.shape)
    (dx,) = torch.autograd.grad(values, x, grad)
    (ref_dx,) = torch.autograd.grad(ref_values, x, grad.double())
    assert torch.equal(dx, ref_dx)


def test_ties_go_to_lower_position_and_nan_ranks_largest():
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([1.0, nan, 1.0, 3.0, -inf, 0.0, nan, inf, 1.0]).view(1, 1, 3, 3)
    values, idx = topk_pool(x, 9, return_indices=True, backend="triton")
    assert idx.flatten().tolist() == [1, 6, 7, 3, 0, 2, 8, 5, 4]
    assert torch.isnan(values[0, 0, :2]).all()
    assert values[0, 0, 2:].tolist() == [inf, 3.0, 1.0, 1.0, 1.0, 0.0, -inf]
    ref_values, ref_idx = topk_pool_reference(x, 9, return_indices=True)
    assert torch.equal(idx, ref_idx)
    # torch.topk agrees on values (its tie order is unspecified).
    torch.testing.assert_close(values, torch.topk(x.flatten(2), 9).values, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_layouts(layout):
    x = layouts(distinct_map(2, 3, 6, 5))[layout]
    values, idx = topk_pool(x, 6, return_indices=True, backend="triton")
    ref_values, ref_idx = topk_pool_reference(x, 6, return_indices=True)
    assert torch.equal(values, ref_values)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("drop", [(0.1, 0.3), (0.2, 0.2)])
def test_dropout_rate_per_rank(backend, drop):
    k, rows = 8, 96 * 64
    x = distinct_map(96, 64, 4, 4) + 1.0  # all values > 0, so a zero means dropped
    torch.manual_seed(0)
    out = topk_pool(x, k, drop=drop, training=True, backend=backend)
    clean = topk_pool_reference(x, k)
    dropped = (out == 0).flatten(0, 1).sum(0)
    for rank, p in enumerate(rank_drop_probs(k, *drop).tolist()):
        assert binomial_sigmas(dropped[rank].item(), rows, p) < 5, (rank, dropped[rank].item() / rows, p)
    scale = 1 / (1 - sum(drop) / 2)
    kept = out != 0
    # Each kept value is the selected value times the scale: the scale and the product rounded to float32.
    assert_as_accurate(out[kept], None, clean[kept].double() * scale, "kept values", floor=2**-23)


def test_dropout_reproducible_and_backward_uses_the_forward_mask():
    x = distinct_map(4, 8, 5, 5).requires_grad_()
    torch.manual_seed(123)
    a = topk_pool(x, 6, drop=(0.1, 0.3), training=True, backend="triton")
    torch.manual_seed(123)
    b = topk_pool(x, 6, drop=(0.1, 0.3), training=True, backend="triton")
    assert torch.equal(a, b)
    c = topk_pool(x, 6, drop=(0.1, 0.3), training=True, backend="triton")
    assert not torch.equal(a, c)
    (dx,) = torch.autograd.grad(a, x, torch.ones_like(a))
    clean, idx = topk_pool_reference(x.detach(), 6, return_indices=True)
    expected = torch.zeros(4, 8, 25, dtype=torch.float64).scatter(-1, idx, (a.detach() != 0).double() / 0.8).view_as(x)
    assert_as_accurate(dx, None, expected, "gradient", floor=2**-23)  # the scale and the product, rounded


def test_mask_does_not_depend_on_tiling(monkeypatch):
    tp = importlib.import_module("lfm_kernels.selection")
    x = distinct_map(3, 5, 6, 7)
    torch.manual_seed(7)
    a = topk_pool(x, 5, drop=(0.1, 0.3), training=True, backend="triton")
    monkeypatch.setattr(tp, "tile_elements", lambda: 64)
    monkeypatch.setattr(tp, "chunk_size", lambda n: 16)
    torch.manual_seed(7)
    b = topk_pool(x, 5, drop=(0.1, 0.3), training=True, backend="triton")
    assert torch.equal(a, b)


def test_eval_mode_ignores_drop():
    x = distinct_map(2, 3, 4, 4)
    assert torch.equal(topk_pool(x, 4, drop=(0.1, 0.3), training=False, backend="triton"), topk_pool_reference(x, 4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must be"), (dict(k=26), "k must be"), (dict(k=2.0), "k must be"),
    (dict(k=3, drop=(0.1, 1.0)), "drop"), (dict(k=3, drop=(0.3, 0.1)), "pmin"), (dict(k=3, drop=(-0.1, 0.1)), "drop"),
    (dict(k=3, drop=0.1), "drop"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        topk_pool(torch.randn(1, 2, 5, 5), training=True, backend="triton", **kwargs)


def test_opcheck_with_dropout():  # the op contract checks the ops without dropout
    x = distinct_map(2, 3, 4, 5).requires_grad_()
    seed = torch.tensor([5, 9])
    torch.library.opcheck(torch.ops.lfm.topk_pool.default, (x, 4, seed, 0.1, 0.3, True))
    idx = topk_pool_reference(x.detach(), 4, return_indices=True)[1]
    keep = torch.ones(2, 3, 4, dtype=torch.uint8)
    torch.library.opcheck(torch.ops.lfm.scatter_rows.default, (torch.randn(2, 3, 4), idx, keep, 1.25, [2, 3, 4, 5]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_without_graph_break(backend):
    module = TopKPool(4, drop=(0.1, 0.3), backend=backend).train()
    x = distinct_map(2, 3, 4, 5).requires_grad_()
    out = torch.compile(module, backend="aot_eager", fullgraph=True)(x)
    out.sum().backward()
    assert out.shape == (2, 3, 4) and x.grad is not None


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), data=st.data())
def test_random_shapes(b, c, h, w, data):
    k = data.draw(st.integers(1, min(h * w, 12)))
    x = distinct_map(b, c, h, w, seed=h * w)
    values, idx = topk_pool(x, k, return_indices=True, backend="triton")
    ref_values, ref_idx = topk_pool_reference(x, k, return_indices=True)
    assert torch.equal(values, ref_values)
    assert torch.equal(idx, ref_idx)
    assert math.prod(values.shape) == b * c * k


def test_large_k_merges_in_bounded_tiles(small_selection_tiles):
    # Candidates beyond one merge tile go through reduction passes (shrunk here so they run on a small
    # map); every valid k up to the kernels' bound works and matches the reference.
    x = distinct_map(2, 3, 10, 10).requires_grad_()
    values, idx = topk_pool(x, 20, return_indices=True, backend="triton")  # 7 chunks x 20 -> 3 groups -> 60
    ref_values, ref_idx = topk_pool_reference(x.detach(), 20, return_indices=True)
    assert torch.equal(values, ref_values)
    assert torch.equal(idx, ref_idx)
    (dx,) = torch.autograd.grad(values.sum(), x)
    assert dx.sum() == values.numel() and torch.equal(dx.flatten(2).gather(-1, idx), torch.ones_like(values))


def test_k_beyond_the_kernels_bound_is_refused_before_launch():
    from lfm_kernels.checks import MAX_KERNEL_K

    x = torch.randn(1, 1, 40, 40)
    with pytest.raises(ValueError, match=rf"k <= {MAX_KERNEL_K}, got k={MAX_KERNEL_K + 1}.*backend='torch'"):
        topk_pool(x, MAX_KERNEL_K + 1, backend="triton")
    assert topk_pool(x, MAX_KERNEL_K + 1, backend="torch").shape == (1, 1, MAX_KERNEL_K + 1)


def test_dropped_infinities_give_nan_as_the_reference_and_f_dropout():
    torch.manual_seed(0)
    x = torch.full((4, 8, 4, 4), float("inf"))
    values = topk_pool(x, 6, drop=(0.2, 0.4), training=True, backend="triton")
    ref = topk_pool_reference(x, 6, drop=(0.2, 0.4), training=True)
    for out in (values, ref):  # kept: inf * scale; dropped: inf * 0 = nan
        assert (torch.isinf(out) | torch.isnan(out)).all() and torch.isnan(out).any() and torch.isinf(out).any()


@pytest.mark.parametrize("drop", [None, (0.1, 0.5)])
def test_rank_merge_gives_the_round_merge_answers(drop):
    """Too few rows for a program per SM (batch 1 on a GPU) take the rank merge, one program per block of a
    row's candidates; with more rows the k-round merge runs. Same values, positions and kept ranks, with
    ties, NaN and empty candidate slots (a row shorter than a chunk)."""
    from utils import recorded_launches

    from lfm_kernels.configs import gpu_tile_sizes
    from lfm_kernels.randomness import draw_seed
    from lfm_kernels.selection import merge_candidates, select_chunks

    x = torch.randint(0, 5, (2, 3, 9, 15)).float()  # under GPU tiles the last 64-position chunk holds 7 < k
    x[0, 1, 3, 4] = x[1, 2, 0, 0] = float("nan")
    seed, k = draw_seed("cpu"), 12
    results = {}
    with recorded_launches() as launches:
        for name, context in (("rounds", contextlib.nullcontext), ("ranks", gpu_tile_sizes)):
            with context():
                out = torch.empty(2, 3, k)
                idx, keep = merge_candidates(*select_chunks(x, k), out, k, seed=seed, drop=drop)
            results[name] = out, idx, keep
    assert [launch.name for launch in launches if "merge" in launch.name] == ["_topk_merge_kernel",
                                                                              "_topk_rank_merge_kernel"]
    for a, b in zip(results["rounds"], results["ranks"]):
        torch.testing.assert_close(a, b, equal_nan=True, atol=0, rtol=0)
    ref_values, ref_idx = topk_pool_reference(x, k, return_indices=True)
    assert torch.equal(results["ranks"][1].view(2, 3, k), ref_idx)
    if drop is None:
        torch.testing.assert_close(results["ranks"][0], ref_values, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_selected_zero_keeps_its_sign(backend):
    # -0.0 and +0.0 tie (torch.topk's order; the lower position wins), and each selected value is the input's,
    # sign included, forward and through the backward's gather of the same positions.
    x = torch.tensor([-0.0, -1.0, 0.0, -0.0, 2.0, -0.0, -3.0, 0.0, -2.0]).view(1, 1, 3, 3).repeat(2, 3, 1, 1)
    x[1, 2] = -0.0
    for requires_grad in (False, True):
        values, idx = topk_pool(x.clone().requires_grad_(requires_grad), 7, return_indices=True, backend=backend)
        ref_values, ref_idx = topk_pool_reference(x, 7, return_indices=True)
        assert torch.equal(idx, ref_idx)
        assert torch.equal(torch.signbit(values), torch.signbit(ref_values)), (values, ref_values)
        assert torch.signbit(values[0, 0, 1:4]).tolist() == [True, False, True]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vmap_batches_like_a_loop(backend):
    x = torch.randn(3, 2, 4, 5, 6)
    batched = torch.func.vmap(lambda t: topk_pool(t, 4, return_indices=True, backend=backend))(x)
    looped = [topk_pool(t, 4, return_indices=True, backend=backend) for t in x]
    for got, want in zip(batched, zip(*looped)):
        assert torch.equal(got, torch.stack(want))
