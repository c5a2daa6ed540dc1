"""Helpers shared by the op tests."""
import contextlib

import torch

DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


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
