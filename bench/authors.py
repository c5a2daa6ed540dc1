"""LFM in plain eager PyTorch, computed the way the authors' released code computes it: the eager baseline.

Frozen down/up-sampling convs for the residual, an nn.Sequential SNet with F.max_pool2d, a 1x1
scoring conv, torch.topk and the Linear head. Deliberately independent of `lfm.model`'s code (it shares
only the channel widths): when LFM's backends change (fused SNet, fused head), this baseline stays what the
authors run. Parameter
names match the authors' checkpoint, so one state_dict loads into this and into `lfm.LFM`.
The per-op benchmarks call the same functions, so "eager" means one thing everywhere.
"""
import torch
import torch.nn.functional as F
from torch import nn

from bench.shapes import SCORE_CHANNELS, SNET_CHANNELS, K


def frozen_npr_convs():
    """The authors' residual convs: a 2x2/stride-2 conv keeping each cell's top-left pixel and a
    transposed conv copying it back over the cell; both frozen."""
    down = nn.Conv2d(3, 3, 2, stride=2, bias=False)
    up = nn.ConvTranspose2d(3, 3, 2, stride=2, bias=False)
    with torch.no_grad():
        down.weight.zero_()
        up.weight.zero_()
        for c in range(3):
            down.weight[c, c, 0, 0] = 1.0
            up.weight[c, c] = 1.0
    down.weight.requires_grad_(False)
    up.weight.requires_grad_(False)
    return down, up


def authors_residual(x, downsample_conv, upsample_conv):
    """abs(NPR): x minus its cell's top-left pixel, through the two frozen convs."""
    return (x - upsample_conv(downsample_conv(x))).abs()


def snet_layer(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def authors_snet_block(x, layer: nn.Sequential, pool: bool):
    """One SNet block: the layer's Conv2d -> BatchNorm2d -> ReLU, then a 2x2 max-pool for blocks 1-3."""
    x = layer(x)
    return F.max_pool2d(x, 2) if pool else x


def authors_topk(scores, k: int):
    """Per channel the k largest scores over all positions, descending: (B, C, k)."""
    return torch.topk(scores.flatten(2), k, dim=-1).values


def authors_rank_dropout(values, pmin: float, pmax: float):
    """Rank-based linear dropout of (B, C, k) values sorted descending: rank 0 dropped with pmax,
    the last with pmin, survivors scaled by 1 / (1 - mean p). The released code passes pmax = pmin."""
    probs = torch.linspace(pmax, pmin, values.shape[-1], device=values.device)
    keep = torch.rand(values.shape, device=values.device) >= probs
    return values * keep / (1.0 - probs.mean())


def authors_random_k(scores, k: int):
    """Values at k distinct uniformly random positions per channel, sorted ascending: (B, C, k)."""
    flat = scores.flatten(2)
    idx = torch.rand(flat.shape, device=flat.device).topk(k, dim=-1).indices
    return flat.gather(-1, idx).sort(dim=-1).values


class AuthorsSNet(nn.Module):
    def __init__(self):
        super().__init__()
        for i, (cin, cout) in enumerate(zip(SNET_CHANNELS[:-1], SNET_CHANNELS[1:]), start=1):
            self.add_module(f"layer{i}", snet_layer(cin, cout))

    def forward(self, x):
        x = authors_snet_block(x, self.layer1, pool=True)
        x = authors_snet_block(x, self.layer2, pool=True)
        x = authors_snet_block(x, self.layer3, pool=True)
        return authors_snet_block(x, self.layer4, pool=False)


class AuthorsLFM(nn.Module):
    """The authors' LFM: (B, 3, H, W) ImageNet-normalized -> (B, 1) logits; released dropout in training
    (constant p = pmin, as their `linspace(pmin, pmin, K)` does); random-K off, as in their trainer."""

    def __init__(self, k: int = K, pmin: float = 0.1):
        super().__init__()
        self.k, self.pmin = k, pmin
        self.downsample_conv, self.upsample_conv = frozen_npr_convs()
        self.cnn = AuthorsSNet()
        self.covn1_1 = nn.Conv2d(SNET_CHANNELS[-1], SCORE_CHANNELS, kernel_size=1, bias=False)
        self.fc1 = nn.Linear(SCORE_CHANNELS * k, 1)

    def forward(self, x):
        feat = self.cnn(authors_residual(x, self.downsample_conv, self.upsample_conv))
        top = authors_topk(self.covn1_1(feat), self.k)
        if self.training:
            top = authors_rank_dropout(top, self.pmin, self.pmin)
        return self.fc1(top.flatten(1))
