"""What every public op promises, checked for each op from one table (one entry per op and mode):
the Triton kernels agree with the PyTorch reference in float64, forward and backward, with the
interpreter's tiles and with the tile sizes a GPU gets; and an empty batch gives empty outputs
and zero gradients without touching any state. Per-op files keep what is specific to their op."""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from utils import distinct_map

from lfm_kernels import npr_residual, score_topk, snet_block, snet_head, topk_pool


def _block_params(cin, cout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(cout, cin, 2, 2, generator=g, dtype=torch.float64) / (2 * cin**0.5),
            torch.randn(cout, generator=g, dtype=torch.float64) * 0.1,
            torch.rand(cout, generator=g, dtype=torch.float64) + 0.5,
            torch.randn(cout, generator=g, dtype=torch.float64) * 0.1]


def _running_stats(cout, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(cout, generator=g, dtype=torch.float64) * 0.1,
            torch.rand(cout, generator=g, dtype=torch.float64) + 0.5]


@dataclass
class OpCase:
    """inputs(B) -> (differentiable float64 tensors, state tensors); run(backend, inputs, state) -> output."""
    name: str
    inputs: Callable
    run: Callable
    atol: float = 1e-5


def _image(B, C=3, H=11, W=10):
    return torch.randn(B, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(B))


OPS = [
    OpCase("npr_residual", lambda B: ([_image(B)], []),
           lambda backend, t, s: npr_residual(t[0], backend=backend)),
    OpCase("topk_pool", lambda B: ([distinct_map(B, 3, 9, 10, dtype=torch.float64)], []),
           lambda backend, t, s: topk_pool(t[0], 7, backend=backend)),
    OpCase("score_topk", lambda B: ([_image(B, 24, 9, 10), torch.randn(20, 24, 1, 1, dtype=torch.float64)], []),
           lambda backend, t, s: score_topk(t[0], t[1], 5, input_precision="ieee", backend=backend)),
    OpCase("snet_block eval", lambda B: ([_image(B, 20)] + _block_params(20, 40), _running_stats(40)),
           lambda backend, t, s: snet_block(*t, *s, input_precision="ieee", backend=backend)),
    OpCase("snet_block train stem", lambda B: ([_image(B)] + _block_params(3, 24), _running_stats(24)),
           lambda backend, t, s: snet_block(*t, *s, training=True, npr=True, input_precision="ieee",
                                            backend=backend)),
    OpCase("snet_block train no pool", lambda B: ([_image(B, 20)] + _block_params(20, 40), _running_stats(40)),
           lambda backend, t, s: snet_block(*t, *s, training=True, pool=False, input_precision="ieee",
                                            backend=backend)),
    OpCase("snet_head eval", lambda B: ([_image(B, 20), *_block_params(20, 40)[:4],
                                         torch.randn(80, 40, 1, 1, dtype=torch.float64) / 40**0.5],
                                        _running_stats(40)),
           lambda backend, t, s: snet_head(t[0], *t[1:5], *s, t[5], 3, input_precision="ieee", backend=backend)),
]


def _as(dtype, tensors, grad):
    return [t.to(dtype).requires_grad_(grad) for t in tensors]


@pytest.mark.parametrize("case", OPS, ids=lambda c: c.name)
def test_matches_reference_forward_and_backward(case, tiles):
    inputs, state = case.inputs(2)
    ours_in, ours_state = _as(torch.float32, inputs, True), _as(torch.float32, state, False)
    ref_in, ref_state = _as(torch.float64, inputs, True), _as(torch.float64, state, False)
    out = case.run("triton", ours_in, ours_state)
    ref = case.run("torch", ref_in, ref_state)
    torch.testing.assert_close(out.double(), ref, atol=case.atol, rtol=1e-5)
    for mine, theirs in zip(ours_state, ref_state):  # running statistics, where training updates them
        torch.testing.assert_close(mine.double(), theirs, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(ref)
    mine = torch.autograd.grad(out, ours_in, grad.float())
    theirs = torch.autograd.grad(ref, ref_in, grad)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=f"gradient of input {i}")


@pytest.mark.parametrize("case", OPS, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(case, backend):
    inputs, state = case.inputs(0)
    tensors, state = _as(torch.float32, inputs, True), _as(torch.float32, state, False)
    before = [s.clone() for s in state]
    out = case.run(backend, tensors, state)
    assert out.shape[0] == 0
    assert case.run("torch", _as(torch.float32, inputs, True), _as(torch.float32, case.inputs(0)[1], False)).shape \
        == out.shape
    for s, b in zip(state, before):  # an empty batch never touches the running statistics
        assert torch.equal(s, b)
    grads = torch.autograd.grad(out.sum(), tensors, allow_unused=True)
    for t, g in zip(tensors, grads):
        assert g is None or (g.shape == t.shape and not g.any())
