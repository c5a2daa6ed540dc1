"""The kernels on a CUDA GPU at LFM's sizes (256x256 images, batch 64) against the PyTorch reference and eager
cuDNN, forward and backward, float32 and bfloat16. Skipped without a GPU.

The smoke tier of the GPU run (bench/gpu_suite.py, first) runs these with `pytest -m gpu`; kernel checks come
first, torch.compile last, since the tier stops at its time cap.
"""
import pytest
import torch
import torch.nn.functional as F

from bench.providers import CHECKPOINT, authors_files
from lfm import LFM
from lfm_kernels import (
    npr_residual,
    npr_residual_reference,
    random_k_pool,
    score_topk,
    score_topk_reference,
    snet_block,
    snet_block_reference,
    snet_head,
    snet_head_reference,
    topk_pool,
    topk_pool_reference,
)

pytestmark = pytest.mark.gpu
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
TOL = {torch.float32: 2e-2, torch.bfloat16: 6e-2}  # TF32 convs (as cuDNN by default) / bf16
# Norm-relative error bound of results that go through a Top-K selection: a near-tie that rounding flips
# moves one value's gradient to the neighbouring position, which elementwise tolerances cannot absorb.
NORM_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
K, DROP = 16, (0.1, 0.3)


def cudnn_reference(allow_tf32: bool):
    """cuDNN on (flags() without enabled=True turns it off), its default algorithms (no benchmark search)."""
    return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=allow_tf32)


def assert_norm_close(ours, expected, dtype, name=""):
    ours, expected = ours.double(), expected.double()
    error = ((ours - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    assert error <= NORM_TOL[dtype], f"{name}: norm-relative error {error:.2e} > {NORM_TOL[dtype]:.0e}"


def forward_backward(fn, inputs):
    """fn(*inputs) and the gradients of <out, fixed random weights> with respect to the floating inputs."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda").to(out.dtype)
    out.backward(grad)
    return out, [t.grad for t in inputs if t.requires_grad]


def check_against_reference(op, reference, inputs, dtype):
    """Our op (backend triton) against the reference on the same inputs upcast to float32, forward and
    backward: the reference computes what the kernels compute (bfloat16 operands, float32 arithmetic)."""
    out, grads = forward_backward(lambda *x: op(*x, backend="triton"), inputs)
    assert out.dtype == dtype
    with cudnn_reference(allow_tf32=False):
        expected, expected_grads = forward_backward(reference, [t.float() for t in inputs])
    assert_norm_close(out, expected, dtype, "forward")
    for i, (mine, theirs) in enumerate(zip(grads, expected_grads)):
        assert_norm_close(mine, theirs, dtype, f"gradient of input {i}")


def _params(cin, cout, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    tensors = [torch.randn(cout, cin, 2, 2, generator=g) / (2 * cin**0.5), torch.randn(cout, generator=g) * 0.1,
               torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g) * 0.1,
               torch.randn(cout, generator=g) * 0.1, torch.rand(cout, generator=g) + 0.5]
    return [t.to(device) for t in tensors]


@DTYPES
def test_npr_residual_full_size(dtype):
    image = torch.randn(64, 3, 256, 256, device="cuda", dtype=dtype)
    check_against_reference(lambda x, backend: npr_residual(x, backend=backend), npr_residual_reference, [image], dtype)


@DTYPES
def test_topk_pool_full_size(dtype):
    scores = torch.randn(64, 64, 30, 30, device="cuda", dtype=dtype)
    check_against_reference(lambda x, backend: topk_pool(x, K, backend=backend), lambda x: topk_pool_reference(x, K),
                            [scores], dtype)


@DTYPES
def test_topk_pool_rank_dropout_full_size(dtype):
    scores = torch.randn(64, 64, 30, 30, device="cuda", dtype=dtype, requires_grad=True)
    values, idx = topk_pool(scores, K, drop=DROP, training=True, return_indices=True, backend="triton")
    expected, expected_idx = topk_pool_reference(scores.detach(), K, return_indices=True)
    assert torch.equal(idx, expected_idx)
    kept = values != 0
    scale = 1 / (1 - sum(DROP) / 2)
    torch.testing.assert_close(values[kept].float(), expected[kept].float() * scale, rtol=1e-2 if dtype != torch.float32
                               else 1e-6, atol=0)
    dropped_share = 1 - kept.float().mean().item()
    assert abs(dropped_share - sum(DROP) / 2) < 0.01  # 65536 values, sigma about 0.002
    values.backward(torch.ones_like(values))  # the gradient flows through the kept values only, scaled
    grad = torch.zeros_like(scores).flatten(2).scatter(-1, idx, kept.to(dtype) * scale)
    torch.testing.assert_close(scores.grad.flatten(2), grad)


@DTYPES
def test_random_k_pool_full_size(dtype):
    scores = torch.randn(64, 64, 30, 30, device="cuda", dtype=dtype, requires_grad=True)
    values, idx = random_k_pool(scores, K, return_indices=True, backend="triton")
    flat = scores.detach().flatten(2)
    assert torch.equal(values, flat.gather(-1, idx)) and bool((values[..., 1:] >= values[..., :-1]).all())
    assert bool((idx.sort(dim=-1).values.diff(dim=-1) > 0).all())  # k distinct positions
    values.backward(torch.ones_like(values))
    assert torch.equal(scores.grad.flatten(2), torch.zeros_like(flat).scatter(-1, idx, 1.0))


@DTYPES
def test_score_topk_full_size(dtype):
    feat = torch.randn(64, 512, 30, 30, device="cuda", dtype=dtype).relu()
    weight = (torch.randn(64, 512, 1, 1, device="cuda") / 512**0.5).to(dtype)
    # The scoring GEMM, the Top-K merge and both gradients (rank dropout shares topk_pool's code).
    check_against_reference(lambda f, w, backend: score_topk(f, w, K, input_precision="ieee", backend=backend),
                            lambda f, w: score_topk_reference(f, w, K), [feat, weight], dtype)


@DTYPES
def test_snet_head_full_size(dtype):
    block4 = [p.to(dtype) for p in _params(256, 512, "cuda")]
    x = torch.randn(64, 256, 31, 31, device="cuda").abs().to(dtype)
    score_weight = (torch.randn(64, 512, 1, 1, device="cuda") / 512**0.5).to(dtype)
    with torch.no_grad():  # inference: one kernel for block 4, scoring and Top-K candidates
        ours = snet_head(x, *block4, score_weight, K, input_precision="ieee", backend="triton")
        with cudnn_reference(allow_tf32=False):
            expected = snet_head_reference(*[t.float() for t in (x, *block4, score_weight)], K)
    assert_norm_close(ours, expected, dtype)


@DTYPES
@pytest.mark.parametrize("cin,cout,size,npr,pool", [(3, 64, 256, True, True), (64, 128, 127, False, True),
                                                    (128, 256, 63, False, True), (256, 512, 31, False, False)],
                         ids=["block1", "block2", "block3", "block4"])
def test_snet_blocks_full_size(dtype, cin, cout, size, npr, pool):
    x = torch.randn(64, cin, size, size, device="cuda")
    params = _params(cin, cout, "cuda")
    for training in (False, True):
        ours = [t.clone().requires_grad_() for t in [x] + params[:4]]
        ref = [t.clone().requires_grad_() for t in [x] + params[:4]]
        stats_ours, stats_ref = [p.clone() for p in params[4:]], [p.clone() for p in params[4:]]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = snet_block(*ours, *stats_ours, training=training, pool=pool, npr=npr, backend="triton")
            with cudnn_reference(allow_tf32=True):  # eager cuDNN as deployed: TF32 for float32
                expected = snet_block_reference(*ref, *stats_ref, training=training, pool=pool, npr=npr)
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype] * scale, rtol=TOL[dtype])
        grad = torch.randn_like(expected)
        out.backward(grad.to(out.dtype))
        with cudnn_reference(allow_tf32=True):
            expected.backward(grad)
        for mine, theirs in zip(ours, ref):
            g_scale = theirs.grad.float().abs().max().item()
            torch.testing.assert_close(mine.grad.float(), theirs.grad.float(), atol=TOL[dtype] * g_scale,
                                       rtol=TOL[dtype])
        if training:
            for mine, theirs in zip(stats_ours, stats_ref):
                torch.testing.assert_close(mine, theirs, atol=1e-2, rtol=1e-2)


@pytest.fixture(scope="module")
def authors_reference():
    """The authors' checkpoint and reference outputs; "not run: no weights" when they are not there,
    so that a GPU run without them says so rather than passing quietly."""
    folder = authors_files()
    if folder is None:
        pytest.skip(f"not run: no weights ({CHECKPOINT} is not under $LFM_SHARED, ./shared or ../shared)")
    load = dict(weights_only=True, map_location="cpu")
    return torch.load(folder / CHECKPOINT, **load), torch.load(folder / "reference_outputs.pt", **load)


def test_lfm_parity_with_authors_checkpoint_on_gpu(authors_reference):
    state_dict, ref = authors_reference
    model = LFM(backend="triton", input_precision="ieee").cuda().eval()
    model.load_state_dict(state_dict)
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
    with cudnn_reference(allow_tf32=False):
        for model in (eager, fused):
            F.binary_cross_entropy_with_logits(model(x), y).backward()
    # A conv bias before BatchNorm has a gradient of exactly zero, computed as rounding noise: its atol has a
    # floor at the model's gradient scale.
    model_scale = max(p.grad.abs().max().item() for p in eager.parameters() if p.grad is not None)
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        if p.grad is not None:
            atol = max(1e-3 * p.grad.abs().max().item(), 1e-5 * model_scale)
            torch.testing.assert_close(q.grad, p.grad, atol=atol, rtol=1e-3, msg=name)


def test_ops_under_torch_compile():
    feat = torch.randn(64, 512, 30, 30, device="cuda", requires_grad=True)
    weight = torch.randn(64, 512, 1, 1, device="cuda") / 512**0.5

    def head(x, w):
        top = score_topk(x, w, 16, drop=(0.1, 0.3), training=True)
        return top.sum() + topk_pool(x[:, :8], 16).sum() + random_k_pool(x[:, :8], 16).sum()

    torch.compile(head, fullgraph=True)(feat, weight).backward()
    assert feat.grad is not None and torch.isfinite(feat.grad).all()


def test_lfm_compiles_on_gpu():
    model = LFM(backend="triton").cuda().eval()
    x = torch.randn(8, 3, 256, 256, device="cuda")
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), expected, atol=1e-4, rtol=1e-4)
