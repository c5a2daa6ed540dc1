"""NPR baseline (Tan et al., "Rethinking the Up-Sampling Operations in CNN-based Generative Network for
Generalizable Deepfake Detection", CVPR 2024), the detector LFM is compared with.

The signed neighbor-pixel residual scaled by 2/3 goes through a ResNet-50 cut after layer2: a 3x3/2
stem conv, BatchNorm, ReLU and 3x3/2 max-pool, layer1 (3 bottlenecks, 256 channels), layer2
(4 bottlenecks, 512 channels, stride 2), then global average pooling and Linear(512 -> 1).
Module names follow torchvision's ResNet, as the NPR authors' do.
"""
import torch.nn.functional as F
from torch import nn

from lfm_kernels import npr_residual
from lfm_kernels.backend import check_backend_name

RESIDUAL_SCALE = 2.0 / 3.0


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand (x4), each with BatchNorm; identity or
    projection shortcut; ReLU after the sum."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


def _stage(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(in_channels, width, stride)]
    layers += [Bottleneck(width * Bottleneck.expansion, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class NPR(nn.Module):
    """The NPR detector. `model(x)` on a float (B, 3, H, W) ImageNet-normalized batch returns (B, 1) logits."""

    min_size = 2

    def __init__(self, backend=None):
        super().__init__()
        self.backend = backend if backend is None else check_backend_name(backend)
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, blocks=3, stride=1)
        self.layer2 = _stage(256, 128, blocks=4, stride=2)
        self.fc1 = nn.Linear(128 * Bottleneck.expansion, 1)
        for module in self.modules():  # torchvision's ResNet initialization
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"NPR expects a float (B, 3, H, W) batch, got shape {tuple(x.shape)} dtype {x.dtype}")
        residual = npr_residual(x, 2, absolute=False, backend=self.backend) * RESIDUAL_SCALE
        x = self.maxpool(F.relu(self.bn1(self.conv1(residual))))
        x = self.layer2(self.layer1(x))
        return self.fc1(x.mean(dim=(2, 3)))
