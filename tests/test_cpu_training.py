"""The torch backend's training path on CPU (lfm_kernels.snet_block_torch): the references' outputs, gradients
and running statistics."""
import pytest
import torch
from utils import BRANCH_FLIP_FLOOR, assert_as_accurate, assert_training_step_as_accurate, block_params, training_step

from bench.authors import AuthorsLFM
from lfm import LFM
from lfm_kernels import snet_block, snet_block_reference, snet_block_torch, topk_pool, topk_pool_reference


def _block_run(fn, x, params, npr, pool, seed=1):
    """Output, gradients of (x, conv weight, conv bias, bn weight, bn bias) and running statistics."""
    x = x.detach().clone().requires_grad_(not npr)
    params = [None if p is None else p.detach().clone().requires_grad_(i < 4) for i, p in enumerate(params)]
    out = fn(x, *params, training=True, npr=npr, pool=pool)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(grad)
    grads = [x.grad] + [None if p is None else p.grad for p in params[:4]]
    return out.detach(), grads, params[4:]


def _assert_block_matches(x, params, npr, pool, tol):
    ours = _block_run(lambda *a, **k: snet_block(*a, backend="torch", **k), x, params, npr, pool)
    ref = _block_run(snet_block_reference, x, params, npr, pool)
    torch.testing.assert_close(ours[0], ref[0], atol=tol, rtol=tol)
    for a, b in zip(ours[1] + ours[2], ref[1] + ref[2]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("chunk_bytes", [1, 4000, 1 << 30])  # one image per chunk, a few, the whole batch
@pytest.mark.parametrize("npr,Cin,H,W,pool", [
    (True, 3, 9, 11, True),     # stem, odd size: the last row and column are in no window
    (False, 20, 8, 7, True),
    (False, 20, 7, 8, False),   # block 4
])
def test_block_matches_the_reference_in_float64(monkeypatch, chunk_bytes, npr, Cin, H, W, pool):
    monkeypatch.setattr(snet_block_torch, "CHUNK_BYTES", chunk_bytes)
    x = torch.randn(5, Cin, H, W, dtype=torch.float64)
    params = block_params(Cin, 16, dtype=torch.float64)
    _assert_block_matches(x, params, npr, pool, 1e-10)
    _assert_block_matches(x, [params[0], None, *params[2:4], None, None], npr, pool, 1e-10)  # no bias, no stats


BLOCK_RESULTS = ("input", "conv weight", "conv bias", "bn weight", "bn bias")


def test_block_float32_is_as_accurate_as_the_reference():
    """At LFM's stem sizes, in float32: the output, each gradient and running statistic against the float64
    reference, as accurate as the float32 reference."""
    x = torch.randn(4, 3, 64, 64)
    params = block_params(3, 64)
    ours = _block_run(lambda *a, **k: snet_block(*a, backend="torch", **k), x, params, True, True)
    ref32 = _block_run(snet_block_reference, x, params, True, True)
    ref64 = _block_run(snet_block_reference, x.double(), [p.double() for p in params], True, True)
    assert_as_accurate(ours[0], ref32[0], ref64[0], "forward", norm=True)
    for name, a, b, c in zip(BLOCK_RESULTS, ours[1], ref32[1], ref64[1]):
        if name == "conv bias":  # zero in exact arithmetic under batch statistics: rounding noise on both sides
            assert_as_accurate(a, b, c, "gradient of the conv bias", norm=True, scale=ref64[1][1].norm())
        elif c is not None:
            assert_as_accurate(a, b, c, f"gradient of the {name}", norm=True, floor=BRANCH_FLIP_FLOOR)
    for name, a, b, c in zip(("running mean", "running var"), ours[2], ref32[2], ref64[2]):
        assert_as_accurate(a, b, c, name)


def test_block_pool_ties_send_the_gradient_where_max_pool_does(monkeypatch):
    monkeypatch.setattr(snet_block_torch, "CHUNK_BYTES", 1)
    x = torch.zeros(3, 8, 9, 9, dtype=torch.float64)
    x[:, :, 4:, 4:] = torch.randint(-1, 2, (3, 8, 5, 5)).double()  # flat regions and few values: ties everywhere
    params = block_params(8, 4, dtype=torch.float64)
    _assert_block_matches(x, params, False, True, 1e-10)


def test_other_inputs_take_the_reference():
    x = torch.randn(2, 8, 6, 6)
    params = block_params(8, 4)
    assert snet_block_torch.fast_training(x, *params)
    assert not snet_block_torch.fast_training(x.half(), *[p.half() for p in params])
    assert not snet_block_torch.fast_training(x[:0], *params)
    assert not snet_block_torch.fast_training(x.double(), *params)  # mixed dtypes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not snet_block_torch.fast_training(x, *params)
    weight = params[0].requires_grad_(True)
    out = snet_block(x.bfloat16(), weight.bfloat16(), *[p.bfloat16() for p in params[1:]], training=True,
                     backend="torch")
    out.float().sum().backward()  # the reference, through the casts
    assert weight.grad is not None


@pytest.mark.parametrize("drop", [None, (0.1, 0.3)])
def test_topk_pool_training_matches_the_reference_with_ties(drop):
    x = torch.randint(-2, 3, (3, 4, 7, 9)).double().requires_grad_(True)
    outs = {}
    for name, fn in (("ours", lambda *a, **k: topk_pool(*a, backend="torch", **k)), ("ref", topk_pool_reference)):
        x.grad = None
        torch.manual_seed(0)  # the same dropout mask
        values, idx = fn(x, 5, drop=drop, training=True, return_indices=True)
        values.backward(torch.arange(values.numel(), dtype=x.dtype).view_as(values))
        outs[name] = values.detach(), idx, x.grad.clone()
    for a, b in zip(outs["ours"], outs["ref"]):
        assert torch.equal(a, b)


def test_lfm_training_step_has_the_authors_gradients(official):
    """One training step of LFM on the torch backend and of the authors' code, both in float32, each against
    the authors' code in float64: the logits, every gradient and running statistic as accurate as theirs."""
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[0.0], [1.0], [1.0]])
    runs = {}
    for name, model, dtype in (("ours", LFM(backend="torch", dropout="released"), torch.float32),
                               ("authors", AuthorsLFM(), torch.float32), ("truth", AuthorsLFM(), torch.float64)):
        model.load_state_dict(official["state_dict"])
        runs[name] = training_step(model, x, target, dtype)
    assert_training_step_as_accurate(runs["ours"], runs["authors"], runs["truth"])
