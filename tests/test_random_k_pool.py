
import pytest
import torch
from utils import binomial_sigmas, distinct_map

from lfm_kernels import random_k_pool


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape,k", [((3, 4, 5, 7), 6), ((2, 2, 3, 3), 9), ((1, 3, 70, 71), 16)])
def test_distinct_positions_sorted_values(backend, shape, k):
    x = distinct_map(*shape)
    values, idx = random_k_pool(x, k, return_indices=True, backend=backend)
    assert values.shape == (*shape[:2], k)
    flat = idx.flatten(0, 1)
    assert all(len(set(row.tolist())) == k for row in flat)
    assert ((flat >= 0) & (flat < shape[2] * shape[3])).all()
    assert torch.equal(values, x.flatten(2).gather(-1, idx))
    assert (values[..., 1:] >= values[..., :-1]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_positions_are_uniform(backend):
    B, C, H, W, k = 50, 64, 3, 4, 3
    torch.manual_seed(0)
    idx = random_k_pool(distinct_map(B, C, H, W), k, return_indices=True, backend=backend)[1]
    counts = torch.bincount(idx.flatten(), minlength=H * W)
    n = B * C  # each row picks each position with probability k / (H*W)
    for c in counts.tolist():
        assert binomial_sigmas(c, n, k / (H * W)) < 5
    # Pairs are uniform too (distinct k-subsets): position 0 and 1 together with prob k(k-1)/(N(N-1)).
    both = ((idx == 0).any(-1) & (idx == 1).any(-1)).sum().item()
    assert binomial_sigmas(both, n, k * (k - 1) / (H * W * (H * W - 1))) < 5


def test_seeded_and_backward_goes_to_sampled_positions():
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    torch.manual_seed(3)
    a, idx = random_k_pool(x, 4, return_indices=True, backend="triton")
    torch.manual_seed(3)
    b = random_k_pool(x, 4, backend="triton")
    assert torch.equal(a, b)
    grad = torch.randn_like(a)
    (dx,) = torch.autograd.grad(a, x, grad)
    expected = torch.zeros(2, 3, 30).scatter(-1, idx, grad).view_as(x)
    assert torch.equal(dx, expected)  # one gradient per sampled position, copied


def test_nan_sorts_last():
    x = torch.tensor([float("nan"), 2.0, -1.0, 0.5]).view(1, 1, 2, 2)
    values = random_k_pool(x, 4, backend="triton")
    assert values[0, 0, :3].tolist() == [-1.0, 0.5, 2.0] and torch.isnan(values[0, 0, 3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x = distinct_map(2, 2, 4, 4).to(dtype)
    values, idx = random_k_pool(x, 5, return_indices=True, backend="triton")
    assert values.dtype == dtype
    assert torch.equal(values, x.flatten(2).gather(-1, idx))


@pytest.mark.parametrize("k", [0, 21, None])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        random_k_pool(torch.randn(1, 1, 4, 5), k, backend="triton")


def test_large_k_merges_in_bounded_tiles(small_selection_tiles):
    x = distinct_map(2, 3, 10, 10)
    values, idx = random_k_pool(x, 20, return_indices=True, backend="triton")
    assert all(len(set(row.tolist())) == 20 for row in idx.flatten(0, 1))  # distinct positions
    assert torch.equal(values, x.flatten(2).gather(-1, idx))
    assert (values.diff(dim=-1) > 0).all()  # ascending


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_sampled_zero_keeps_its_sign(backend):
    x = torch.full((2, 3, 4, 5), -0.0)
    x[:, :, ::2] = 0.0
    values, idx = random_k_pool(x, 12, return_indices=True, backend=backend)
    assert torch.equal(torch.signbit(values), torch.signbit(x.flatten(2).gather(-1, idx)))
