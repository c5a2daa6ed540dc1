"""Where LFM looks: the image regions behind the Top-K positions of its 64 score maps.

Position (i, j) of the SNet output grid sees input pixels [8i, 8i + 22] x [8j, 8j + 22] (see
lfm.inference, whose lfm_topk finds the positions, in tiles for a large image).
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .inference import RECEPTIVE_FIELD, STRIDE, lfm_topk
from .model import snet_output_size

BAND_PIXELS = 1 << 20  # pixels per band of the overlay


class TopKHeat:
    """Per pixel of an (H, W) input, how many of an LFM's 64 * K Top-K picks have it in their receptive field,
    made a band of rows at a time from the picks' positions: memory for a band, not for the whole image."""

    def __init__(self, positions: torch.Tensor, size):
        self.height, self.width = size
        h, w = snet_output_size(*size)
        self.hits = torch.bincount(positions.flatten().cpu(), minlength=h * w).view(1, 1, h, w).float()
        self.box = torch.ones(1, 1, RECEPTIVE_FIELD, RECEPTIVE_FIELD)

    @classmethod
    def of(cls, model, x: torch.Tensor) -> "TopKHeat":
        """The heat of a (1, 3, H, W) input of an LFM model (normalized, or uint8 pixels)."""
        with torch.no_grad():
            _, positions = lfm_topk(model, x)
        return cls(positions, x.shape[2:])

    def rows(self, top: int, bottom: int) -> np.ndarray:
        """Rows [top, bottom) of the heat, (bottom - top, W) float32."""
        band = torch.zeros(bottom - top, self.width)
        # Only positions whose windows [8i, 8i + 22] meet these rows add to them.
        first = max(0, -(-(top - RECEPTIVE_FIELD + 1) // STRIDE))
        last = min(self.hits.shape[2], (bottom - 1) // STRIDE + 1)
        if first < last:
            spread = F.conv_transpose2d(self.hits[:, :, first:last], self.box, stride=STRIDE)[0, 0]
            part = spread[top - STRIDE * first:bottom - STRIDE * first, :self.width]
            band[:part.shape[0], :part.shape[1]] = part
        return band.numpy()

    def peak(self) -> float:
        step = max(1, BAND_PIXELS // self.width)
        return max(float(self.rows(top, min(self.height, top + step)).max()) for top in range(0, self.height, step))


class StretchedHeat:
    """A heat on any grid, stretched bilinearly to an image of `size` (W, H), with TopKHeat's interface."""

    def __init__(self, heat: np.ndarray, size):
        self.image = Image.fromarray(np.asarray(heat, dtype=np.float32))
        self.width, self.height = size
        self.max = float(heat.max())

    def rows(self, top: int, bottom: int) -> np.ndarray:
        # Resampling a box of the heat gives exactly these rows of the whole stretched heat.
        scale = self.image.height / self.height
        return np.asarray(self.image.resize((self.width, bottom - top), Image.BILINEAR,
                                            box=(0, top * scale, self.image.width, bottom * scale)))

    def peak(self) -> float:
        return self.max


def topk_heat(model, x: torch.Tensor) -> np.ndarray:
    """The whole (H, W) float32 TopKHeat of a (1, 3, H, W) input of an LFM model."""
    heat = TopKHeat.of(model, x)
    return heat.rows(0, heat.height)


def overlay(img: Image.Image, heat, strength: float = 0.65) -> Image.Image:
    """Blend a black-red-yellow-white ramp of `heat` over an RGB image: a TopKHeat of the image, or an array
    on any grid, stretched to the image. Done in bands of rows, so memory beyond the image and the result
    stays under a few BAND_PIXELS floats."""
    if isinstance(heat, TopKHeat) and (heat.width, heat.height) != img.size:  # the heat of a resized input
        heat = heat.rows(0, heat.height)
    if isinstance(heat, np.ndarray):
        heat = StretchedHeat(heat, img.size)
    width, height = img.size
    peak = max(heat.peak(), 1e-12)
    rows = max(1, BAND_PIXELS // width)
    out = Image.new("RGB", img.size)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        level = heat.rows(top, bottom) / peak
        ramp = np.clip(np.stack([3 * level, 3 * level - 1, 3 * level - 2], axis=-1), 0, 1) * 255
        alpha = strength * level[..., None]
        pixels = np.asarray(img.crop((0, top, width, bottom)), dtype=np.float32)
        blended = (1 - alpha) * pixels + alpha * ramp
        out.paste(Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8)), (0, top))
    return out
