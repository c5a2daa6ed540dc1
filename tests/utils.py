"""Helpers shared by the tests."""
import contextlib
import copy

import torch

DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Error every result may have against its float64 truth on top of twice the reference implementation's
# error: a few units of the result's rounding, for results whose errors are both tiny.
ROUNDING_FLOOR = {torch.float64: 1e-14, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
# For gradients through ReLU, max-pool or Top-K at the small sizes of the CPU tests: a rounding flip of one
# near-tie (which side of zero, which position of a window or rank wins) moves one whole term of the
# gradient, about 3e-4 of its norm at LFM's stem sizes, on whichever side the CPU's kernels round that way.
# At full size both sides flip many ties and their errors average out; on CPU, one flip is all or nothing.
BRANCH_FLIP_FLOOR = 1e-3
# For logits of a whole float32 LFM (five convolution layers, BatchNorm, Top-K, the linear head): their error
# against the float64 truth measured 0.4e-6 to 3.8e-6 (max-abs relative, logits about 3) for the authors'
# eager code and ours, at 224 and 256 pixels, under ATen's default, AVX2 and AVX-512 kernels; 2.5e-6 for the
# logits of a fused training step under the default kernels.
NETWORK_FLOOR = 5e-6


def truth_error(x, truth, norm, scale=None):
    """x's error against the float64 truth, relative to `scale`: the Frobenius norm of the difference over
    the truth's (norm=True), or the largest difference over the truth's largest magnitude."""
    diff = x.detach().to(torch.float64) - truth.detach().to(torch.float64)
    if norm:
        return (diff.norm() / (truth.norm() if scale is None else scale)).item()
    return (diff.abs().max() / (truth.abs().max() if scale is None else scale)).item()


def assert_as_accurate(ours, reference, truth, name, norm=False, floor=None, scale=None):
    """Ours and the reference implementation (float32 or lower), each against the float64 truth of the same
    computation: ours' error may be at most twice the reference's plus `floor` (default: a few units of
    ours' rounding). Norm-relative errors (norm=True) for anything that passes ReLU, max-pool or Top-K;
    `scale` for a truth that is zero in exact arithmetic (errors are then relative to a neighbour's size).
    reference=None: ours' error against `floor` alone."""
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)}, float64 truth {tuple(truth.shape)}"
    floor = ROUNDING_FLOOR.get(ours.dtype, 0.0) if floor is None else floor
    ours_error = truth_error(ours, truth, norm, scale)
    reference_error = 0.0 if reference is None else truth_error(reference, truth, norm, scale)
    bound = 2 * reference_error + floor
    kind = "norm-relative" if norm else "max-abs relative"
    assert ours_error <= bound, (
        f"{name}: ours is off the float64 truth by {ours_error:.2e} ({kind}), the reference by "
        f"{reference_error:.2e}: more than twice the reference's plus {floor:.0e}")


def assert_nan_and_as_accurate(ours, reference, truth, name, **kwargs):
    """NaN exactly where the float64 truth has NaN, on both sides; the other values as assert_as_accurate."""
    nan = torch.isnan(truth)
    assert torch.equal(torch.isnan(ours), nan) and torch.equal(torch.isnan(reference), nan), f"{name}: NaN positions"
    assert_as_accurate(*(t.nan_to_num(0.0) for t in (ours, reference, truth)), name, **kwargs)


def float64_truth(module, x):
    """`module`'s output for x, computed by a float64 copy of it from x in float64."""
    with torch.no_grad():
        return copy.deepcopy(module).double()(x.double())


def assert_module_as_accurate(ours, module, x, name="logits", **kwargs):
    """ours (a result for x) and `module` run on x in float32, each against float64_truth(module, x)
    (assert_as_accurate)."""
    with torch.no_grad():
        reference = module(x)
    assert_as_accurate(ours, reference, float64_truth(module, x), name, **kwargs)


def distinct_map(B, C, H, W, dtype=torch.float32, seed=0):
    """A (B, C, H, W) map whose rows are shuffled aranges: distinct values, unambiguous Top-K indices."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(H * W, generator=g) for _ in range(B * C)]
    return torch.stack(rows).view(B, C, H, W).to(dtype) if rows else torch.empty(B, C, H, W, dtype=dtype)


def layouts(x):
    """x as contiguous, channels_last and a non-contiguous (transposed-back) view, same values."""
    return {
        "contiguous": x.contiguous(),
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": x.transpose(2, 3).contiguous().transpose(2, 3),
    }


def binomial_sigmas(count, n, p):
    """How many standard deviations `count` successes out of n lie from the expected n*p."""
    return abs(count - n * p) / (n * p * (1 - p)) ** 0.5


def real_photo_batch(names=("astronaut", "coffee"), size=64):
    """ImageNet-normalized float32 (len(names), 3, size, size) center crops of photos that ship offline (the
    demo's sources), box-downscaled by 2 first (JPEG's 4:2:0 chroma leaves a 2x2 trace otherwise)."""
    from lfm.demo import PHOTO_SOURCES, as_rgb, box_downscale

    crops = []
    for name in names:
        image = box_downscale(as_rgb(PHOTO_SOURCES[name]()[0]))
        top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
        crops.append(torch.from_numpy(image[top:top + size, left:left + size].copy()).permute(2, 0, 1))
    x = torch.stack(crops).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def block_params(cin, cout, seed=0, dtype=torch.float32):
    """An SNet block's (conv weight, conv bias, bn weight, bn bias, running mean, running var), seeded, at
    scales that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(cout, cin, 2, 2, generator=g, dtype=dtype) / (2 * cin**0.5),
            torch.randn(cout, generator=g, dtype=dtype) * 0.1,
            torch.rand(cout, generator=g, dtype=dtype) + 0.5,
            torch.randn(cout, generator=g, dtype=dtype) * 0.1,
            torch.randn(cout, generator=g, dtype=dtype) * 0.1,
            torch.rand(cout, generator=g, dtype=dtype) + 0.5]


@contextlib.contextmanager
def recorded_launches():
    """A list that fills with every kernel launch (configs.Launch: name, grid, args, meta) while active."""
    from lfm_kernels.configs import observe_launches

    launches = []
    with observe_launches(launches.append):
        yield launches


def training_step(model, x, target, dtype=torch.float32, seed=3):
    """One training step of `model` converted to `dtype` (in place): its logits, parameter gradients and
    running statistics by name. The seed fixes the dropout mask, which every model draws in float32."""
    model.to(dtype).train()
    torch.manual_seed(seed)
    logits = model(x.to(dtype))
    torch.nn.functional.binary_cross_entropy_with_logits(logits, target.to(dtype)).backward()
    return {"logits": logits.detach(), **{n: p.grad for n, p in model.named_parameters() if p.requires_grad},
            **{n: b for n, b in model.state_dict().items() if "running" in n}}


def assert_training_step_as_accurate(ours, reference, truth, floor=BRANCH_FLIP_FLOOR):
    """training_step results of ours and the reference implementation against the float64 truth: logits (above
    NETWORK_FLOOR) and running statistics elementwise, gradients norm-relative with `floor` (through ReLU,
    max-pool, Top-K)."""
    assert ours.keys() == reference.keys() == truth.keys()
    for name in truth:
        if name == "logits":
            assert_as_accurate(ours[name], reference[name], truth[name], name, floor=NETWORK_FLOOR)
        elif "running" in name:
            assert_as_accurate(ours[name], reference[name], truth[name], name)
        elif name.startswith("cnn.") and name.endswith(".0.bias"):
            # A conv bias before BatchNorm has a gradient of exactly zero: rounding noise on both sides,
            # measured against the size of the same conv's weight gradient.
            assert_as_accurate(ours[name], reference[name], truth[name], f"gradient of {name}", norm=True,
                               scale=truth[name.replace(".bias", ".weight")].norm())
        else:
            assert_as_accurate(ours[name], reference[name], truth[name], f"gradient of {name}", norm=True,
                               floor=floor)


def assert_authors_logits(ours, authors_logits, size, rows=slice(None)):
    """ours (logits for `rows` of the authors' reference input of `size`) and the authors' eager code in float32
    on this machine, each against the authors' code in float64 (the authors_logits fixture)."""
    eager, truth = authors_logits[size][1:]
    assert_as_accurate(ours, eager[rows], truth[rows], f"logits at {size}", floor=NETWORK_FLOOR)


def authors_outputs(state_dict, x, dtype, k=16):
    """The authors' eager code in `dtype` on x's device, in eval mode: residual, score maps, Top-K values and
    logits."""
    from bench.authors import AuthorsLFM, authors_residual, authors_topk

    model = AuthorsLFM(k=k).to(x.device, dtype).eval()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        residual = authors_residual(x.to(dtype), model.downsample_conv, model.upsample_conv)
        maps = model.covn1_1(model.cnn(residual))
        top = authors_topk(maps, k)
        return {"residual": residual, "maps": maps, "topk": top, "logits": model.fc1(top.flatten(1))}
