"""The torch backend's inference path (snet_block_torch, topk_torch, npr_residual_inference) against the references."""
import pytest
import torch
from utils import (
    NETWORK_FLOOR,
    assert_as_accurate,
    assert_authors_logits,
    assert_nan_and_as_accurate,
    block_params,
    float64_truth,
)

from lfm import LFM
from lfm_kernels import (
    snet_block,
    snet_block_reference,
    snet_block_torch,
    snet_head,
    snet_head_reference,
    topk_pool,
    topk_pool_reference,
)
from lfm_kernels.npr_residual import npr_residual_inference, npr_residual_reference
from lfm_kernels.snet_block_torch import max_pool_2x2
from lfm_kernels.topk_pool import topk_select_reference
from lfm_kernels.topk_torch import RANK_MATRIX_MAX_K, topk_select


def _same_bits(a, b):
    """Equal values, -0.0 told from 0.0 and NaN equal to NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("seed", range(60))
def test_topk_select_is_exactly_the_stable_sort_with_ties_nan_and_signed_zeros(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 120, (1,), generator=g))
    flat = torch.randint(-3, 4, (4, 5, n), generator=g).float()  # few distinct values: ties everywhere
    special = torch.rand(flat.shape, generator=g)
    flat[special < 0.15] = float("nan")
    flat[(special >= 0.15) & (special < 0.3)] = -0.0
    if seed % 4 == 0:
        flat[0, 0] = float("nan")  # a row of NaN only
        flat[1, 1] = float("inf")
    for k in {1, min(n, 16), n, min(n, RANK_MATRIX_MAX_K + 1)}:
        values, idx = topk_select(flat, k)
        ref_values, ref_idx = topk_select_reference(flat, k)
        assert torch.equal(idx, ref_idx), k
        _same_bits(values, ref_values)


def test_topk_select_distinct_values_and_float64():
    flat = torch.randn(3, 64, 961, dtype=torch.float64)
    values, idx = topk_select(flat, 16)
    ref_values, ref_idx = topk_select_reference(flat, 16)
    assert torch.equal(idx, ref_idx) and torch.equal(values, ref_values)


def test_topk_pool_eval_uses_the_same_selection_and_keeps_the_reference_for_training():
    x = torch.randint(0, 3, (2, 4, 7, 9)).float()
    for return_indices in (False, True):
        out = topk_pool(x, 5, return_indices=return_indices, backend="torch")
        ref = topk_pool_reference(x, 5, return_indices=return_indices)
        for a, b in zip(out if return_indices else (out,), ref if return_indices else (ref,)):
            assert torch.equal(a, b)
    x.requires_grad_(True)
    topk_pool(x, 5, backend="torch").sum().backward()  # gradients go through the reference
    assert x.grad.sum() == 2 * 4 * 5


@pytest.mark.parametrize("H,W", [(6, 8), (7, 9), (2, 3), (9, 4)])
def test_npr_residual_inference_any_size(H, W):
    x = torch.randn(2, 3, H, W)
    # One subtraction: the float64 truth rounded once.
    assert torch.equal(npr_residual_inference(x), npr_residual_reference(x.double(), 2, True).float())


@pytest.mark.parametrize("H,W", [(8, 8), (9, 7), (3, 5)])
def test_max_pool_without_indices_keeps_nan_and_floor_mode(H, W):
    y = torch.randn(2, 4, H, W).contiguous(memory_format=torch.channels_last)
    y[0, 1, 0, 1] = float("nan")
    torch.testing.assert_close(max_pool_2x2(y), torch.nn.functional.max_pool2d(y, 2), atol=0, rtol=0,
                               equal_nan=True)  # a selection: exact


CASES = [  # (B, Cin, Cout, H, W, npr, pool)
    (2, 3, 16, 9, 11, True, True),     # stem with an odd size
    (2, 3, 16, 8, 10, True, True),
    (2, 20, 24, 8, 7, False, True),    # odd conv output
    (1, 20, 40, 7, 8, False, False),   # block 4
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,Cin,Cout,H,W,npr,pool", CASES)
def test_block_eval_matches_reference(B, Cin, Cout, H, W, npr, pool, dtype):
    x = torch.randn(B, Cin, H, W, dtype=torch.float64)
    params = block_params(Cin, Cout, dtype=torch.float64)
    for bias in (params[1], None):
        args = (x, params[0], bias, *params[2:])
        truth = snet_block_reference(*args, pool=pool, npr=npr)
        args = [None if t is None else t.to(dtype) for t in args]
        out = snet_block(*args, pool=pool, npr=npr, backend="torch")
        ref = snet_block_reference(*args, pool=pool, npr=npr)
        assert out.dtype == ref.dtype == dtype
        assert_as_accurate(out, ref, truth, "output", norm=True)


@pytest.mark.parametrize("chunk_bytes", [1, 3000, 40000])  # row bands of one row, of several rows, image chunks
@pytest.mark.parametrize("npr,H,W", [(True, 9, 11), (True, 12, 10), (False, 8, 7)])
def test_block_eval_by_chunks_matches_reference(monkeypatch, chunk_bytes, npr, H, W):
    monkeypatch.setattr(snet_block_torch, "CHUNK_BYTES", chunk_bytes)
    Cin = 3 if npr else 20
    x = torch.randn(5, Cin, H, W)
    x[3, :, 4, 5] = float("nan")
    params = block_params(Cin, 16)
    out = snet_block(x, *params, npr=npr, backend="torch")
    ref = snet_block_reference(x, *params, npr=npr)
    truth = snet_block_reference(x.double(), *[p.double() for p in params], npr=npr)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_nan_and_as_accurate(out, ref, truth, "output", norm=True)
    assert snet_block(x[:0], *params, npr=npr, backend="torch").shape == (0, *ref.shape[1:])


def test_block_eval_propagates_nan():
    x = torch.randn(1, 8, 10, 10)  # NaN reaches 4 of the 16 pooled positions
    x[0, :, 2, 2] = float("nan")
    params = block_params(8, 4)
    out = snet_block(x, *params, backend="torch")
    ref = snet_block_reference(x, *params)
    truth = snet_block_reference(x.double(), *[p.double() for p in params])
    assert torch.isnan(truth).any() and not torch.isnan(truth).all()
    assert_nan_and_as_accurate(out, ref, truth, "output", norm=True)


def test_block_under_bf16_autocast_stays_close_to_reference():
    x = torch.randn(2, 16, 12, 12)
    params = block_params(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = snet_block(x, *params, backend="torch")
        ref = snet_block_reference(x, *params)
    truth = snet_block_reference(x.double(), *[p.double() for p in params])
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_as_accurate(out, ref, truth, "output under bfloat16 autocast", norm=True)


def test_head_eval_matches_reference_with_ties():
    x = torch.randn(2, 16, 9, 10)
    params = block_params(16, 8)
    score_weight = torch.randn(4, 8, 1, 1)
    score_weight[1] = 0  # a score map of zeros only: every position ties
    args = (x, *params, score_weight, 6)
    values, idx = snet_head(*args, return_indices=True, backend="torch")
    ref_values, ref_idx = snet_head_reference(*args, return_indices=True)
    truth = snet_head_reference(*[t.double() if torch.is_tensor(t) else t for t in args])
    assert torch.equal(idx[:, 1], ref_idx[:, 1])
    assert_as_accurate(values, ref_values, truth, "Top-K values", norm=True)
    assert torch.equal(idx, ref_idx)


def test_gradient_still_flows_through_the_reference():
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    params = block_params(8, 4)
    snet_block(x, *params, backend="torch").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_folding_is_never_stale_after_parameter_updates():
    model = LFM(backend="torch").eval()
    x = torch.randn(2, 3, 64, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    for step in range(2):
        with torch.no_grad():
            fast = model(x)
        with torch.enable_grad():
            ref = model(x)  # gradients needed: the reference path
        assert_as_accurate(fast, ref.detach(), float64_truth(model, x), f"logits after {step} updates",
                           floor=NETWORK_FLOOR)
        ref.sum().backward()
        optimizer.step()
        with torch.no_grad():
            model.cnn.layer2.bn.running_var.data.mul_(1.5)
            model.cnn.layer4.conv.weight.data.add_(0.01)


def test_authors_logits_in_inference_mode(official, authors_logits):
    model = LFM(backend="torch").eval()
    model.load_state_dict(official["state_dict"], strict=True)
    odd = official["outputs"]["x256"][:, :, :251, :237]
    truth = float64_truth(model, odd)
    with torch.inference_mode():
        for size in ("x256", "x224"):
            assert_authors_logits(model(authors_logits[size][0]), authors_logits, size)
        with torch.enable_grad():
            expected = model(odd).detach()  # the reference path
        assert_as_accurate(model(odd), expected, truth, "logits at 251x237", floor=NETWORK_FLOOR)
