import copy

import pytest
import torch
from torch import nn
from utils import (
    assert_as_accurate,
    assert_module_as_accurate,
    assert_nan_and_as_accurate,
    block_params,
    float64_truth,
    real_photo_batch,
    recorded_launches,
)

from lfm import LFM
from lfm_kernels import snet_block, snet_block_reference
from lfm_kernels.nn import SNetBlock

CASES = [  # (B, Cin, Cout, H, W, npr, pool)
    (2, 3, 16, 9, 11, True, True),     # stem: residual fused, odd sizes
    (2, 20, 24, 8, 7, False, True),    # odd conv output: last row/col outside every pool window
    (1, 20, 40, 7, 8, False, False),   # block 4: no pool, Cout not a power of 2
]


@pytest.mark.parametrize("B,Cin,Cout,H,W,npr,pool", CASES)
def test_eval_matches_reference_in_float64(B, Cin, Cout, H, W, npr, pool):
    x = torch.randn(B, Cin, H, W, dtype=torch.float64)
    params = block_params(Cin, Cout, dtype=torch.float64)
    out = snet_block(x.float(), *[p.float() for p in params], pool=pool, npr=npr, input_precision="ieee",
                     backend="triton")
    ref = snet_block_reference(x, *params, pool=pool, npr=npr)
    ref32 = snet_block_reference(x.float(), *[p.float() for p in params], pool=pool, npr=npr)
    assert_as_accurate(out, ref32, ref, "output", norm=True)


LEAVES = ("x", "conv_weight", "conv_bias", "bn_weight", "bn_bias")


def _block_run(block, x, params, dtype, training, image_grad=True, **kwargs):
    """Output, gradients of LEAVES (output gradient: seeded; x's None without image_grad) and running
    statistics of one call in `dtype`."""
    leaves = [x.to(dtype).requires_grad_(image_grad)] + [t.to(dtype).requires_grad_() for t in params[:4]]
    stats = [t.to(dtype).clone() for t in params[4:]]
    out = block(*leaves, *stats, training=training, **kwargs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    return out.detach(), [t.grad for t in leaves], stats


def _assert_block_run_as_accurate(x, params, training, input_precision=None, **kwargs):
    """Our kernels and the reference in float32, each against the reference in float64: the output, every
    gradient and running statistic (image_grad=False: no gradient of x)."""
    ours = _block_run(snet_block, x, params, torch.float32, training, input_precision=input_precision,
                      backend="triton", **kwargs)
    ref32, truth = (_block_run(snet_block_reference, x, params, dtype, training, **kwargs)
                    for dtype in (torch.float32, torch.float64))
    assert_as_accurate(ours[0], ref32[0], truth[0], "output", norm=True)
    for i, name in enumerate(LEAVES):
        if truth[1][i] is None:
            continue
        # Under batch statistics the conv bias's gradient is zero in exact arithmetic: rounding noise on both
        # sides, measured against the size of the conv weight's gradient.
        scale = truth[1][1].norm() if name == "conv_bias" and training else None
        assert_as_accurate(ours[1][i], ref32[1][i], truth[1][i], f"gradient of {name}", norm=True, scale=scale)
    for name, mine, theirs, exact in zip(("running_mean", "running_var"), ours[2], ref32[2], truth[2]):
        assert_as_accurate(mine, theirs, exact, name)


@pytest.mark.parametrize("B,Cin,Cout,H,W,npr,pool", CASES)
def test_training_forward_backward_and_running_stats(B, Cin, Cout, H, W, npr, pool):
    x = torch.randn(B, Cin, H, W, dtype=torch.float64)
    _assert_block_run_as_accurate(x, block_params(Cin, Cout, dtype=torch.float64), True, momentum=0.3, pool=pool,
                                  npr=npr)


def test_eval_mode_gradients():
    # Eval mode with gradients (e.g. saliency): fixed statistics, no batch-stat terms in the backward.
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    _assert_block_run_as_accurate(x, block_params(8, 16, dtype=torch.float64), False, input_precision="ieee")


def test_training_is_deterministic():
    x = torch.randn(2, 8, 9, 9)
    params = block_params(8, 16)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in [x] + params[:4]]
        snet_block(*leaves, *[p.clone() for p in params[4:]], training=True, backend="triton").pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("npr,image_grad", [(False, True), (True, True), (True, False)])
def test_training_computes_each_conv_once_per_pass(npr, image_grad):
    # Blocks 2-4: one conv GEMM in the forward (statistics in its epilogue, the conv stored for a memory-bound
    # normalize pass) and one in the backward before the gradient GEMMs. The stem computes its cheap conv
    # twice in the forward instead of storing 64 channels, and without an image gradient a third time in
    # the backward, where its weight gradient comes out of the same pass.
    cin = 3 if npr else 8
    leaves = [t.requires_grad_() for t in block_params(cin, 16)[:4]]
    x = torch.randn(2, cin, 9, 9, requires_grad=image_grad)
    with recorded_launches() as forward:
        out = snet_block(x, *leaves, *block_params(cin, 16)[4:], training=True, npr=npr, backend="triton")
    with recorded_launches() as backward:
        out.sum().backward()
    # The per-program partials of each pass are merged by a kernel of their own (no torch reductions).
    reductions = ("_merge_batch_stats_kernel", "_sum_partials_kernel")
    passes = [[launch.name for launch in launches if launch.name not in reductions] for launches in (forward, backward)]
    stored = ["_snet_block_stats_kernel", "_snet_block_apply_kernel"]
    assert passes[0] == (["_snet_block_stats_kernel", "_snet_stem_kernel"] if npr else stored)
    assert [launch.meta["STORE_Z"] for launch in forward if launch.name == stored[0]] == [not npr]
    expected = (["_snet_block_dy_sums_kernel", "_snet_block_dz_kernel", "_conv2x2_dw_kernel", "_conv2x2_dx_kernel"]
                if image_grad else ["_snet_block_dy_sums_kernel", "_snet_stem_wgrad_kernel"])
    assert passes[1][:len(expected)] == expected
    # The statistics; the sums of dy and dy * zhat (one launch for both), the conv bias's and the conv
    # weight's gradients.
    assert [launch.name for launch in forward].count(reductions[0]) == 1
    assert [launch.name for launch in backward].count(reductions[1]) == 3


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("B,H,W,pool", [(2, 9, 11, True), (3, 8, 7, True), (2, 7, 8, False)])
def test_stem_gradients_without_an_image_gradient(B, H, W, pool, training, tiles):
    # The one-pass stem backward (no d(conv out) in memory), with batch statistics and with the running ones.
    x = torch.randn(B, 3, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(B * H * W))
    _assert_block_run_as_accurate(x, block_params(3, 24, dtype=torch.float64), training, pool=pool, npr=True,
                                  image_grad=False)


def test_snet_block_module_loads_sequential_state_dict():
    seq = nn.Sequential(nn.Conv2d(8, 16, 2), nn.BatchNorm2d(16), nn.ReLU())
    seq[1].running_mean.normal_()
    block = SNetBlock(8, 16, pool=False, input_precision="ieee", backend="triton")
    block.load_state_dict(seq.state_dict(), strict=True)
    seq.eval(), block.eval()
    x = torch.randn(2, 8, 6, 7)
    with torch.no_grad():
        assert_module_as_accurate(block(x), seq, x, "output", norm=True)


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_module_reads_replaced_and_parametrized_tensors_on_every_call():
    """SNetBlock reads its tensors from its children's dicts (host time): a replaced parameter is seen at
    once, and a parametrized one (not in those dicts) through its attribute."""
    from torch.nn.utils import parametrize

    seq = nn.Sequential(nn.Conv2d(8, 16, 2), nn.BatchNorm2d(16), nn.ReLU()).eval()
    block = SNetBlock(8, 16, pool=False, input_precision="ieee", backend="triton").eval()
    block.load_state_dict(seq.state_dict())
    x = torch.randn(2, 8, 6, 7)
    with torch.no_grad():
        block(x)
        block.bn.weight = nn.Parameter(torch.rand(16) + 0.5)
        seq[1].weight.copy_(block.bn.weight)
        parametrize.register_parametrization(block.conv, "weight", Doubled())
        seq[0].weight.mul_(2)
        assert_module_as_accurate(block(x), seq, x, "output", norm=True)


def test_module_training_updates_buffers_like_batchnorm():
    seq = nn.Sequential(nn.Conv2d(8, 16, 2), nn.BatchNorm2d(16, momentum=None), nn.ReLU())
    block = SNetBlock(8, 16, pool=False, backend="triton")
    block.load_state_dict(seq.state_dict())
    block.bn.momentum = None  # a hyper-parameter, not in the state_dict
    seq64 = copy.deepcopy(seq).double()
    for _ in range(2):
        x = torch.randn(2, 8, 6, 7)
        with torch.no_grad():
            assert_as_accurate(block(x), seq(x), seq64(x.double()), "output", norm=True)
    for name in ("running_mean", "running_var"):
        assert_as_accurate(getattr(block.bn, name), getattr(seq[1], name), getattr(seq64[1], name), name)
    assert block.bn.num_batches_tracked == seq[1].num_batches_tracked == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(conv_weight=torch.randn(16, 7, 2, 2)), r"\(Cout, 8, 2, 2\)"),
    (dict(conv_weight=torch.randn(16, 8, 3, 3)), r"\(Cout, 8, 2, 2\)"),
    (dict(bn_weight=torch.ones(15)), r"bn_weight must have shape \(16,\)"),
    (dict(x=torch.randn(1, 8, 2, 9)), "at least 3x3"),
    (dict(input_precision="fp8"), "input_precision"),
    (dict(running_mean=None), "running_mean"),
    (dict(running_var=torch.ones(16, dtype=torch.float64)), "running_mean and running_var must have one dtype"),
    (dict(bn_bias=torch.zeros(16, dtype=torch.float64)), "bn_weight and bn_bias must have one dtype"),
])
def test_bad_input(kwargs, match):
    args = dict(zip(("conv_weight", "conv_bias", "bn_weight", "bn_bias", "running_mean", "running_var"),
                    block_params(8, 16)))
    args = dict(x=torch.randn(1, 8, 5, 5)) | args | kwargs
    with pytest.raises(ValueError, match=match):
        snet_block(args.pop("x"), *[args.pop(n) for n in ("conv_weight", "conv_bias", "bn_weight", "bn_bias",
                                                          "running_mean", "running_var")], backend="triton", **args)


def _saved_bytes(model, x):
    """Bytes of the tensors autograd saves for backward in one forward, parameters excluded, each storage once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def test_activation_memory_of_the_whole_snet_is_3x_smaller_than_eager():
    ours = LFM(backend="triton").train().cnn
    eager = LFM(backend="torch").train().cnn
    eager.load_state_dict(ours.state_dict())

    def eager_forward(x):  # the authors' structure: Sequential blocks, max-pool in forward
        from lfm_kernels import npr_residual
        x = npr_residual(x, backend="torch")
        for i in range(1, 5):
            block = getattr(eager, f"layer{i}")
            x = torch.relu(block.bn(block.conv(x)))
            x = torch.nn.functional.max_pool2d(x, 2) if i < 4 else x
        return x

    def per_two_images(model):  # the bytes that grow with the batch: not the packed weights ours save once
        return _saved_bytes(model, torch.randn(4, 3, 64, 64)) - _saved_bytes(model, torch.randn(2, 3, 64, 64))

    ours_bytes = per_two_images(ours)
    eager.forward = eager_forward
    eager_bytes = per_two_images(eager)
    assert eager_bytes >= 3 * ours_bytes, (eager_bytes, ours_bytes)


def test_lfm_under_bfloat16_autocast_matches_torch_backend():
    torch.manual_seed(0)
    eager = LFM(backend="torch").eval()
    fused = LFM(backend="triton").eval()
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 48, 50)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = fused(x), eager(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert_as_accurate(ours, theirs, float64_truth(eager, x), "logits under bfloat16 autocast")


def test_stem_under_bfloat16_autocast_takes_the_residual_before_rounding():
    # Neighboring pixels of a real photo differ by a level or two (about 0.017 after normalization),
    # close to bf16's spacing near |x| = 2: rounding the image before the residual would cost several
    # times the error of the torch backend, which takes the residual in float32 and rounds after.
    x = real_photo_batch()
    params = block_params(3, 64)
    exact = snet_block_reference(x.double(), *[p.double() for p in params], npr=True)
    errors = {}
    for backend in ("torch", "triton"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = snet_block(x, *params, npr=True, backend=backend)
        assert out.dtype == torch.bfloat16
        errors[backend] = (out.double() - exact).abs().mean().item()
    # Rounding the image first measured 2.9x the torch backend's mean error here; the remaining gap is
    # the interpreter's truncating bf16 store of the output.
    assert errors["triton"] <= 1.6 * errors["torch"], errors


@pytest.mark.parametrize("pool", [True, False])
def test_nan_propagates_like_pytorch(pool):
    x = torch.randn(2, 8, 9, 8)
    x[1, 3, 4, 5] = float("nan")
    params = block_params(8, 16)
    out = snet_block(x, *params, pool=pool, input_precision="ieee", backend="triton")
    ref = snet_block_reference(x, *params, pool=pool)
    truth = snet_block_reference(x.double(), *[p.double() for p in params], pool=pool)
    assert torch.isnan(truth).any()
    assert_nan_and_as_accurate(out, ref, truth, "output", norm=True)
    # Training: the batch statistics are NaN, so every output and the running statistics are NaN.
    stats, ref_stats = [p.clone() for p in params[4:]], [p.clone() for p in params[4:]]
    out = snet_block(x, *params[:4], *stats, training=True, pool=pool, backend="triton")
    ref = snet_block_reference(x, *params[:4], *ref_stats, training=True, pool=pool)
    assert torch.isnan(ref).all() and torch.isnan(out).all()
    for mine, theirs in zip(stats, ref_stats):
        assert torch.isnan(mine).all() and torch.isnan(theirs).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_with_one_value_per_channel_raises_like_batch_norm(backend):
    # A 1x1 conv map at batch 1: F.batch_norm refuses it; so do both backends, before any launch. Two values
    # per channel (batch 2) train.
    params = block_params(8, 16)
    x = torch.randn(1, 8, 2, 2)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        snet_block_reference(x, *params, training=True, pool=False)
    with recorded_launches() as launches, pytest.raises(ValueError,
                                                         match="Expected more than 1 value per channel when training"):
        snet_block(x, *params, training=True, pool=False, backend=backend)
    assert launches == []
    assert snet_block(x.repeat(2, 1, 1, 1), *params, training=True, pool=False, backend=backend).shape == (2, 16, 1, 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_dtypes_and_empty_channels_raise_on_both_backends(backend):
    params = block_params(8, 16)
    with pytest.raises(ValueError, match="one dtype"):
        snet_block(torch.randn(1, 8, 5, 5, dtype=torch.bfloat16), *params, backend=backend)
    empty = block_params(8, 0)
    with pytest.raises(ValueError, match="Cout >= 1"):
        snet_block(torch.randn(1, 8, 5, 5), *empty, backend=backend)


def test_checks_run_once_per_signature_and_still_refuse_what_they_refused():
    """checks.once_per_signature: mixed dtypes pass under autocast (which casts them to one) and are refused
    outside it, every time; k=True is refused after k=1 passed (True == 1, but not the same signature)."""
    from lfm_kernels.snet_block import check_block
    from lfm_kernels.snet_head import snet_head

    x = torch.randn(1, 4, 5, 5)
    args = (x, torch.randn(8, 4, 2, 2, dtype=torch.float64), None, torch.ones(8), torch.zeros(8), torch.zeros(8),
            torch.ones(8), False, True, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_block(*args)
    for _ in range(2):
        with pytest.raises(ValueError, match="one dtype"):
            check_block(*args)
    block = (torch.randn(8, 4, 2, 2), torch.zeros(8), torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8))
    score_weight = torch.randn(3, 8, 1, 1)
    assert snet_head(x, *block, score_weight, 1, backend="torch").shape == (1, 3, 1)
    with pytest.raises(ValueError, match="k must be an int"):
        snet_head(x, *block, score_weight, True, backend="torch")
