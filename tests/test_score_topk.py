import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from utils import assert_as_accurate

from lfm_kernels import score_topk, score_topk_reference, topk_pool
from lfm_kernels.nn import ScoreTopK


def _inputs(B, Cin, H, W, Cout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Cin, H, W, generator=g, dtype=torch.float64),
            torch.randn(Cout, Cin, 1, 1, generator=g, dtype=torch.float64) / Cin**0.5)


@pytest.mark.parametrize("B,Cin,H,W,Cout,k", [(2, 40, 9, 11, 24, 7), (1, 512, 6, 5, 64, 16), (2, 3, 1, 17, 5, 17),
                                              (1, 20, 30, 30, 8, 16)])
def test_matches_conv_then_topk_in_float64(B, Cin, H, W, Cout, k, tiles):
    feat64, w64 = _inputs(B, Cin, H, W, Cout)
    leaves = {side: (feat64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_())
              for side, dtype in (("ours", torch.float32), ("float32", torch.float32), ("float64", torch.float64))}
    values, idx = score_topk(*leaves["ours"], k, return_indices=True, backend="triton")
    ref32 = score_topk_reference(*leaves["float32"], k)
    truth, ref_idx = score_topk_reference(*leaves["float64"], k, return_indices=True)
    assert_as_accurate(values, ref32, truth, "Top-K values", norm=True)
    assert torch.equal(idx, ref_idx)  # Gaussian scores: no near-ties at this size
    grad = torch.randn(values.shape)
    for out, g in ((values, grad), (ref32, grad), (truth, grad.double())):
        out.backward(g)
    for i, name in enumerate(("features", "weight")):
        grads = (leaves[side][i].grad for side in ("ours", "float32", "float64"))
        assert_as_accurate(*grads, f"gradient of the {name}", norm=True)


def test_equals_topk_pool_of_the_score_map_with_dropout():
    feat64, w64 = _inputs(3, 16, 5, 6, 8)
    feat, w = feat64.float(), w64.float()
    torch.manual_seed(11)
    fused = score_topk(feat, w, 6, drop=(0.1, 0.3), training=True, backend="triton")
    torch.manual_seed(11)
    unfused = topk_pool(F.conv2d(feat, w), 6, drop=(0.1, 0.3), training=True, backend="triton")
    kept = fused != 0  # Gaussian scores: a zero is a dropped rank
    assert torch.equal(kept, unfused != 0)
    truth = score_topk_reference(feat64, w64, 6) * kept / (1 - (0.1 + 0.3) / 2)
    assert_as_accurate(fused, unfused, truth, "Top-K values after dropout", norm=True)


@pytest.mark.parametrize("weight,match", [
    (torch.randn(8, 7, 1, 1), r"\(Cout, 6, 1, 1\)"), (torch.randn(8, 6, 3, 3), r"\(Cout, 6, 1, 1\)"),
    (torch.randn(8, 6), "4 dimensions"), (torch.ones(8, 6, 1, 1, dtype=torch.int64), "floating-point"),
])
def test_bad_weight(weight, match):
    with pytest.raises(ValueError, match=match):
        score_topk(torch.randn(1, 6, 4, 4), weight, 3, backend="triton")


def test_devices_must_match():
    with pytest.raises(ValueError, match="one device"):
        score_topk(torch.randn(1, 6, 4, 4), torch.randn(8, 6, 1, 1, device="meta"), 3, backend="torch")


def test_opcheck_with_dropout():  # the op contract checks the ops without dropout
    feat, w = (t.float().requires_grad_() for t in _inputs(2, 16, 4, 5, 8))
    torch.library.opcheck(torch.ops.lfm.score_topk.default, (feat, w, 4, torch.tensor([3, 4]), 0.1, 0.3, True, "ieee"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_without_graph_break(backend):
    module = ScoreTopK(16, 8, 4, drop=(0.1, 0.3), backend=backend).train()
    feat = torch.randn(2, 16, 4, 5, requires_grad=True)
    out = torch.compile(module, backend="aot_eager", fullgraph=True)(feat)
    out.sum().backward()
    assert out.shape == (2, 8, 4) and module.weight.grad is not None and feat.grad is not None


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 2), cin=st.integers(1, 40), cout=st.integers(1, 20), h=st.integers(1, 8),
       w=st.integers(1, 8), data=st.data())
def test_random_shapes(b, cin, cout, h, w, data):
    k = data.draw(st.integers(1, min(h * w, 10)))
    feat64, weight64 = _inputs(b, cin, h, w, cout, seed=cin * cout)
    feat, weight = feat64.float(), weight64.float()
    assert_as_accurate(score_topk(feat, weight, k, backend="triton"), score_topk_reference(feat, weight, k),
                       score_topk_reference(feat64, weight64, k), "Top-K values", norm=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_edge_shapes_and_dtypes_raise_the_same_error_on_both_backends(backend):
    feat = torch.randn(2, 3, 4, 5)
    for bad_feat, bad_weight, match in ((torch.randn(2, 0, 4, 5), torch.randn(4, 0, 1, 1), "Cout >= 1"),
                                        (feat, torch.randn(0, 3, 1, 1), "Cout >= 1"),
                                        (feat.bfloat16(), torch.randn(4, 3, 1, 1), "one dtype")):
        with pytest.raises(ValueError, match=match):
            score_topk(bad_feat, bad_weight, 2, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vmap_batches_like_a_loop(backend):
    feats, weight = torch.randn(3, 2, 4, 5, 6), torch.randn(5, 4, 1, 1)
    batched = torch.func.vmap(lambda f: score_topk(f, weight, 4, input_precision="ieee", backend=backend))(feats)
    looped = torch.stack([score_topk(f, weight, 4, input_precision="ieee", backend=backend) for f in feats])
    torch.testing.assert_close(batched, looped, atol=0, rtol=0)  # the same kernels on the same rows: exact
