"""nn.Module drop-ins for the fused ops, for use inside any PyTorch model."""
import torch
from torch import nn

from .backend import check_backend_name
from .npr_residual import npr_residual
from .precision import check_precision
from .random_k_pool import random_k_pool
from .randomness import check_drop
from .score_topk import score_topk
from .snet_block import snet_block
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


class SNetBlock(nn.Module):
    """[abs-NPR ->] Conv2d(k=2) -> BatchNorm2d -> ReLU [-> MaxPool2d(2)], fused (lfm_kernels.snet_block).

    Its children are named "0" (Conv2d), "1" (BatchNorm2d) and "2" (ReLU), as in
    nn.Sequential(conv, bn, relu), so it loads that Sequential's state_dict. Nothing derived from the
    parameters is cached: every call reads them as they are.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: bool = True, npr: bool = False,
                 input_precision=None, backend=None):
        super().__init__()
        self.add_module("0", nn.Conv2d(in_channels, out_channels, kernel_size=2))
        self.add_module("1", nn.BatchNorm2d(out_channels))
        self.add_module("2", nn.ReLU(inplace=True))
        check_precision(input_precision)
        self.pool, self.npr, self.input_precision = pool, npr, input_precision
        self.backend = backend if backend is None else check_backend_name(backend)

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._modules["1"]

    def tensors(self):
        """(conv weight, conv bias, bn weight, bn bias, running mean, running var), snet_block's order. Read
        from the children's parameter and buffer dicts: every forward asks, and nn.Module.__getattr__ costs
        about as much per name as a tensor allocation. Parametrized ones (torch.nn.utils.parametrize) are not
        in those dicts: they are read as attributes."""
        conv, bn = self._modules["0"], self._modules["1"]
        try:
            return (conv._parameters["weight"], conv._parameters["bias"], bn._parameters["weight"],
                    bn._parameters["bias"], bn._buffers["running_mean"], bn._buffers["running_var"])
        except KeyError:
            return conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var

    def batchnorm_mode(self):
        """(use batch statistics, momentum) as nn.BatchNorm2d decides them; counts tracked batches."""
        bn = self.bn
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if self.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
        return self.training or bn.running_mean is None, momentum

    def forward(self, x):
        training, momentum = self.batchnorm_mode()
        return snet_block(x, *self.tensors(), eps=self.bn.eps, momentum=momentum, training=training, pool=self.pool,
                          npr=self.npr, input_precision=self.input_precision, backend=self.backend)

    def extra_repr(self):
        return f"pool={self.pool}, npr={self.npr}, input_precision={self.input_precision!r}"
