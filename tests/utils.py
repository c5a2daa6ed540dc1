"""Helpers shared by the op tests."""
import torch

DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def distinct_map(B, C, H, W, dtype=torch.float32, seed=0):
    """A (B, C, H, W) map whose rows are shuffled aranges: distinct values, unambiguous Top-K indices."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(H * W, generator=g) for _ in range(B * C)]
    return torch.stack(rows).view(B, C, H, W).to(dtype)


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
