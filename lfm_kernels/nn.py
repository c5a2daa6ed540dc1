"""nn.Module drop-ins for the fused ops, for use inside any PyTorch model."""
import torch
from torch import nn

from .backend import check_backend_name, check_drop
from .npr_residual import npr_residual
from .random_k_pool import random_k_pool
from .score_topk import score_topk
from .topk_pool import topk_pool


class NPRResidual(nn.Module):
    def __init__(self, factor: int = 2, absolute: bool = True, backend=None):
        super().__init__()
        self.factor, self.absolute = factor, absolute
        self.backend = backend if backend is None else check_backend_name(backend)

    def forward(self, x):
        return npr_residual(x, self.factor, self.absolute, backend=self.backend)

    def extra_repr(self):
        return f"factor={self.factor}, absolute={self.absolute}"


class TopKPool(nn.Module):
    """Per-channel Top-K over H*W -> (B, C, k); rank-based dropout in training when `drop` is set."""

    def __init__(self, k: int, drop=None, backend=None):
        super().__init__()
        self.k, self.drop = k, check_drop(drop)
        self.backend = backend if backend is None else check_backend_name(backend)

    def forward(self, x):
        return topk_pool(x, self.k, drop=self.drop, training=self.training, backend=self.backend)

    def extra_repr(self):
        return f"k={self.k}, drop={self.drop}"


class RandomKPool(nn.Module):
    """Values at k distinct uniformly random positions per channel, sorted ascending -> (B, C, k)."""

    def __init__(self, k: int, backend=None):
        super().__init__()
        self.k = k
        self.backend = backend if backend is None else check_backend_name(backend)

    def forward(self, x):
        return random_k_pool(x, self.k, backend=self.backend)

    def extra_repr(self):
        return f"k={self.k}"


class ScoreTopK(nn.Module):
    """A bias-free 1x1 Conv2d followed by TopKPool, fused; its state_dict holds `weight` like the conv's."""

    def __init__(self, in_channels: int, out_channels: int, k: int, drop=None, backend=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv2d's default
        self.k, self.drop = k, check_drop(drop)
        self.backend = backend if backend is None else check_backend_name(backend)

    def forward(self, x):
        return score_topk(x, self.weight, self.k, drop=self.drop, training=self.training, backend=self.backend)

    def extra_repr(self):
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, k={self.k}, drop={self.drop}"
