import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from utils import assert_as_accurate

from lfm_kernels import npr_residual, npr_residual_reference


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 3, 7, 9), (2, 2, 11, 5), (1, 1, 1, 1)])
@pytest.mark.parametrize("factor", [1, 2, 3])
@pytest.mark.parametrize("absolute", [True, False])
def test_forward_backward_match_float64_reference(shape, factor, absolute):
    # The forward is one subtraction of two float32 values: the float64 truth rounded once, exactly. The
    # backward sums up to factor**2 gradients per anchor: as accurate as the float32 reference.
    x = torch.randn(*shape)
    ours, ref32, ref64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    out = npr_residual(ours, factor, absolute, backend="triton")
    out32, out64 = (npr_residual_reference(t, factor, absolute) for t in (ref32, ref64))
    assert torch.equal(out, out64.float())
    grad = torch.randn(out.shape)
    for o, g in ((out, grad), (out32, grad), (out64, grad.double())):
        o.backward(g)
    # Relative to the incoming gradient: the truth is zero where every pixel is its own anchor (factor 1, 1x1).
    assert_as_accurate(ours.grad, ref32.grad, ref64.grad, "gradient", scale=grad.abs().max())


def test_even_sizes_equal_the_authors_convolutions():
    x = torch.randn(2, 3, 10, 12)
    down = torch.zeros(3, 3, 2, 2)
    up = torch.zeros(3, 3, 2, 2)
    for c in range(3):
        down[c, c, 0, 0] = 1
        up[c, c] = 1
    authors = x - torch.conv_transpose2d(torch.conv2d(x, down, stride=2), up, stride=2)
    # Convolutions with 0/1 weights copy the anchors: every side is the float64 truth rounded once.
    truth = npr_residual_reference(x.double(), 2, True).float()
    assert torch.equal(authors.abs(), truth)
    assert torch.equal(npr_residual(x, backend="triton"), truth)
    assert torch.equal(npr_residual(x, backend="torch"), truth)


def test_odd_size_anchor_is_floor_cell_corner():
    x = torch.arange(25.0).view(1, 1, 5, 5)
    out = npr_residual(x, absolute=False, backend="triton")
    assert out[0, 0, 4, 4] == x[0, 0, 4, 4] - x[0, 0, 4, 4]
    assert out[0, 0, 3, 4] == x[0, 0, 3, 4] - x[0, 0, 2, 4]


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(1, 3, 4, 4), factor=0), "factor"),
    (dict(x=torch.randn(1, 3, 4, 4), factor=1.5), "factor"),
])
def test_bad_factor(bad, match):
    args = dict(factor=2) | bad
    with pytest.raises(ValueError, match=match):
        npr_residual(args.pop("x"), **args, backend="triton")


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 13), w=st.integers(1, 13),
       factor=st.integers(1, 4), absolute=st.booleans())
def test_random_shapes(b, c, h, w, factor, absolute):
    x = torch.randn(b, c, h, w)
    # One subtraction: the float64 truth rounded once.
    assert torch.equal(npr_residual(x, factor, absolute, backend="triton"),
                       npr_residual_reference(x.double(), factor, absolute).float())
