"""LFM: the Local Focus Mechanism detector (Li, Wu, Liu, Li, BMVC 2025), as the authors released it.

abs(NPR residual) -> SNet (4 x [Conv2d k=2, BatchNorm, ReLU], 2x2 max-pool after blocks 1-3)
-> 1x1 scoring conv 512 -> 64 -> per-channel Top-K over positions -> Linear(64*K -> 1).
Parameter names match the authors' checkpoint (including their `covn1_1`), so it loads strictly.
"""
import torch
import torch.nn.functional as F
from torch import nn

from lfm_kernels import random_k_pool, score_topk, snet_head, topk_pool
from lfm_kernels.backend import check_backend_name
from lfm_kernels.nn import SNetBlock
from lfm_kernels.precision import check_precision

SNET_CHANNELS = (3, 64, 128, 256, 512)
SCORE_CHANNELS = 64
DROPOUT_MODES = ("paper", "released", "off")


def snet_output_size(h: int, w: int):
    """Spatial size after SNet: each 2x2 conv takes 1, each pool halves (floor), no pool after block 4."""
    for _ in range(3):
        h, w = (h - 1) // 2, (w - 1) // 2
    return h - 1, w - 1


def min_input_size(k: int) -> int:
    """Smallest square side whose SNet output holds at least k positions."""
    side = 2
    while max(snet_output_size(side, side)[0], 0) ** 2 < k:
        side += 1
    return side


class SNet(nn.Module):
    """abs(NPR residual) of the image -> 4 fused blocks [Conv2d k=2, BatchNorm, ReLU], 2x2 max-pool after
    blocks 1-3; layer1 computes the residual itself. Keys as the authors' nn.Sequential blocks."""

    def __init__(self, input_precision=None, backend=None):
        super().__init__()
        for i, (cin, cout) in enumerate(zip(SNET_CHANNELS[:-1], SNET_CHANNELS[1:]), start=1):
            block = SNetBlock(cin, cout, pool=i < 4, npr=i == 1, input_precision=input_precision, backend=backend)
            self.add_module(f"layer{i}", block)

    def trunk(self, x):
        """Blocks 1-3: the image to the input of block 4."""
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x):
        return self.layer4(self.trunk(x))


def _frozen_npr_conv(transposed: bool) -> nn.Module:
    """The authors' frozen 2x2/stride-2 convs that define the residual (kept for their state_dict keys;
    the residual itself is computed by lfm_kernels.npr_residual)."""
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(3, 3, 2, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(3):
            if transposed:
                conv.weight[c, c] = 1.0
            else:
                conv.weight[c, c, 0, 0] = 1.0
    conv.weight.requires_grad_(False)
    return conv


class LFM(nn.Module):
    """The LFM detector. `model(x)` on a float (B, 3, H, W) ImageNet-normalized batch returns (B, 1) logits.

    k: Top-K per score channel (16 as released).
    dropout: rank-based linear dropout of the K values in training mode: "paper" (p rises linearly
        from pmin for the smallest to pmax for the largest), "released" (what the authors' code does:
        constant p = pmin) or "off".
    random_k_weight: weight of the random-K auxiliary loss; when > 0, `model(x, return_aux=True)` in
        training mode also returns the auxiliary logits of K random positions per channel.
    backend: "auto" (default; LFM_BACKEND overrides), "torch" or "triton", for every fused op.
    input_precision: for the Triton convs and scoring on float32 inputs: None (default) follows torch's
        cuDNN switch (torch.backends.cudnn.allow_tf32: TF32 unless turned off), or "tf32" or "ieee".
    """

    def __init__(self, k: int = 16, dropout: str = "paper", pmin: float = 0.1, pmax: float = 0.3,
                 random_k_weight: float = 0.0, backend=None, input_precision=None):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if dropout not in DROPOUT_MODES:
            raise ValueError(f"dropout must be one of {DROPOUT_MODES}, got {dropout!r}")
        if not (0.0 <= pmin <= pmax < 1.0):
            raise ValueError(f"need 0 <= pmin <= pmax < 1, got pmin={pmin}, pmax={pmax}")
        if random_k_weight < 0:
            raise ValueError(f"random_k_weight must be >= 0, got {random_k_weight}")
        check_precision(input_precision)
        self.k, self.dropout, self.pmin, self.pmax = k, dropout, pmin, pmax
        self.random_k_weight = float(random_k_weight)
        self.backend = backend if backend is None else check_backend_name(backend)
        self.min_size = min_input_size(k)
        self.downsample_conv = _frozen_npr_conv(transposed=False)
        self.upsample_conv = _frozen_npr_conv(transposed=True)
        self.cnn = SNet(input_precision, self.backend)
        self.covn1_1 = nn.Conv2d(SNET_CHANNELS[-1], SCORE_CHANNELS, kernel_size=1, bias=False)
        self.fc1 = nn.Linear(SCORE_CHANNELS * k, 1)

    @property
    def drop(self):
        """(pmin, pmax) given to the Top-K op, or None."""
        return {"paper": (self.pmin, self.pmax), "released": (self.pmin, self.pmin), "off": None}[self.dropout]

    def check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"LFM expects a torch.Tensor batch, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"LFM expects a float (B, 3, H, W) batch, got shape {tuple(x.shape)} dtype {x.dtype}")
        h, w = snet_output_size(*x.shape[2:])
        if h < 1 or w < 1 or h * w < self.k:
            raise ValueError(
                f"input {x.shape[2]}x{x.shape[3]} leaves {max(h, 0)}x{max(w, 0)} positions after SNet, fewer than "
                f"k={self.k}; the minimum square size is {self.min_size}x{self.min_size}")

    def features(self, x):
        """SNet features (B, 512, h, w) of a checked image batch."""
        return self.cnn(x)

    def forward(self, x, return_aux: bool = False):
        self.check_input(x)
        h = self.cnn.trunk(x)
        aux = None
        if not self.training:
            # Block 4 + scoring + Top-K: one fused kernel (plus the merge) on the triton backend.
            block4 = self.cnn.layer4
            top = snet_head(h, *block4.tensors(), self.covn1_1.weight, self.k, eps=block4.bn.eps,
                            input_precision=block4.input_precision, backend=self.backend)
        elif return_aux and self.random_k_weight > 0:
            scores = F.conv2d(self.cnn.layer4(h), self.covn1_1.weight)
            top = topk_pool(scores, self.k, drop=self.drop, training=True, backend=self.backend)
            aux = self.fc1(random_k_pool(scores, self.k, backend=self.backend).flatten(1))
        else:
            top = score_topk(self.cnn.layer4(h), self.covn1_1.weight, self.k, drop=self.drop, training=True,
                             input_precision=self.cnn.layer4.input_precision, backend=self.backend)
        logits = self.fc1(top.flatten(1))
        return (logits, aux) if return_aux else logits


class LFMGAP(LFM):
    """Ablation of LFM: global average pooling of the 64 score maps instead of Top-K, then Linear(64 -> 1).
    Same residual, SNet and scoring conv (their parameters load from an LFM checkpoint); no dropout."""

    def __init__(self, backend=None):
        super().__init__(k=1, dropout="off", backend=backend)

    def forward(self, x):
        self.check_input(x)
        scores = F.conv2d(self.features(x), self.covn1_1.weight)
        return self.fc1(scores.mean(dim=(2, 3)))
