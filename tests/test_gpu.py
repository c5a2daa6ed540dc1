"""The same checks on a CUDA GPU at full size (256x256, batch 64) against eager cuDNN. Skipped without a GPU.

Run on a GPU machine with `pytest -m gpu` (make gpu-suite does).
"""
import pytest
import torch
import torch.nn.functional as F

from lfm import LFM
from lfm_kernels import (npr_residual, npr_residual_reference, random_k_pool, score_topk, snet_block,
                         snet_block_reference, topk_pool, topk_pool_reference)

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 2e-2, torch.bfloat16: 6e-2}  # TF32 convs (as cuDNN by default) / bf16


def _params(cin, cout, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    tensors = [torch.randn(cout, cin, 2, 2, generator=g) / (2 * cin**0.5), torch.randn(cout, generator=g) * 0.1,
               torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g) * 0.1,
               torch.randn(cout, generator=g) * 0.1, torch.rand(cout, generator=g) + 0.5]
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cin,cout,size,npr,pool", [(3, 64, 256, True, True), (64, 128, 127, False, True),
                                                    (128, 256, 63, False, True), (256, 512, 31, False, False)])
def test_snet_blocks_full_size(dtype, cin, cout, size, npr, pool):
    x = torch.randn(64, cin, size, size, device="cuda")
    params = _params(cin, cout, "cuda")
    for training in (False, True):
        ours = [t.clone().requires_grad_() for t in [x] + params[:4]]
        ref = [t.clone().requires_grad_() for t in [x] + params[:4]]
        stats_ours, stats_ref = [p.clone() for p in params[4:]], [p.clone() for p in params[4:]]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = snet_block(*ours, *stats_ours, training=training, pool=pool, npr=npr, backend="triton")
            expected = snet_block_reference(*ref, *stats_ref, training=training, pool=pool, npr=npr)
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype] * scale, rtol=TOL[dtype])
        grad = torch.randn_like(expected)
        out.backward(grad.to(out.dtype))
        expected.backward(grad)
        for mine, theirs in zip(ours, ref):
            g_scale = theirs.grad.float().abs().max().item()
            torch.testing.assert_close(mine.grad.float(), theirs.grad.float(), atol=TOL[dtype] * g_scale,
                                       rtol=TOL[dtype])
        if training:
            for mine, theirs in zip(stats_ours, stats_ref):
                torch.testing.assert_close(mine, theirs, atol=1e-2, rtol=1e-2)


def test_lfm_parity_with_authors_checkpoint_on_gpu(official):
    ref = official["outputs"]
    model = LFM(backend="triton", input_precision="ieee").cuda().eval()
    model.load_state_dict(official["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x256"].cuda()).cpu(), ref["logits256"], atol=1e-4, rtol=0)
        torch.testing.assert_close(model(ref["x224"].cuda()).cpu(), ref["logits224"], atol=1e-4, rtol=0)


def test_lfm_training_step_gradients_match_eager_on_gpu():
    torch.manual_seed(0)
    eager = LFM(dropout="off", backend="torch", input_precision="ieee").cuda().train()
    fused = LFM(dropout="off", backend="triton", input_precision="ieee").cuda().train()
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(32, 3, 224, 224, device="cuda")
    y = torch.randint(0, 2, (32, 1), device="cuda").float()
    with torch.backends.cudnn.flags(allow_tf32=False):
        for model in (eager, fused):
            F.binary_cross_entropy_with_logits(model(x), y).backward()
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-3 * p.grad.abs().max().item(), rtol=1e-3, msg=name)


def test_ops_full_size_and_under_torch_compile():
    scores = torch.randn(64, 64, 30, 30, device="cuda")
    torch.testing.assert_close(topk_pool(scores, 16), topk_pool_reference(scores, 16))
    image = torch.randn(64, 3, 256, 256, device="cuda")
    torch.testing.assert_close(npr_residual(image), npr_residual_reference(image))
    feat = torch.randn(64, 512, 30, 30, device="cuda")
    weight = torch.randn(64, 512, 1, 1, device="cuda") / 512**0.5
    with torch.backends.cudnn.flags(allow_tf32=False):
        torch.testing.assert_close(score_topk(feat, weight, 16), topk_pool_reference(F.conv2d(feat, weight), 16),
                                   atol=1e-4, rtol=1e-4)

    def head(x, w):
        top = score_topk(x, w, 16, drop=(0.1, 0.3), training=True)
        return top.sum() + topk_pool(x[:, :8], 16).sum() + random_k_pool(x[:, :8], 16).sum()

    compiled = torch.compile(head, fullgraph=True)
    feat.requires_grad_()
    compiled(feat, weight).backward()
    assert feat.grad is not None and torch.isfinite(feat.grad).all()


def test_lfm_compiles_on_gpu():
    model = LFM(backend="triton").cuda().eval()
    x = torch.randn(8, 3, 256, 256, device="cuda")
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), expected, atol=1e-4, rtol=1e-4)
