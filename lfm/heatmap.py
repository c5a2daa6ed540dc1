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


def topk_heat(model, x: torch.Tensor) -> np.ndarray:
    """For a (1, 3, H, W) input of an LFM model (normalized, or uint8 pixels): per input pixel, how many of
    the 64 * K Top-K selections have it in their receptive field. (H, W) float32."""
    with torch.no_grad():
        _, idx = lfm_topk(model, x)
    h, w = snet_output_size(*x.shape[2:])
    hits = torch.bincount(idx.flatten().cpu(), minlength=h * w).view(1, 1, h, w).float()
    spread = F.conv_transpose2d(hits, torch.ones(1, 1, RECEPTIVE_FIELD, RECEPTIVE_FIELD), stride=STRIDE)[0, 0]
    heat = torch.zeros(x.shape[2:])
    rows, cols = min(heat.shape[0], spread.shape[0]), min(heat.shape[1], spread.shape[1])
    heat[:rows, :cols] = spread[:rows, :cols]
    return heat.numpy()


def overlay(img: Image.Image, heat: np.ndarray, strength: float = 0.65) -> Image.Image:
    """Blend a black-red-yellow-white ramp of `heat` (any grid, stretched to the image) over an RGB image.
    Done in bands of rows, so memory beyond the image and the result stays under BAND_PIXELS floats."""
    width, height = img.size
    heat_image = Image.fromarray(heat.astype(np.float32))
    scale_y = heat_image.height / height
    peak = max(float(heat.max()), 1e-12)
    rows = max(1, BAND_PIXELS // width)
    out = Image.new("RGB", img.size)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        # Resampling a box of the heat gives exactly these rows of the whole stretched heat.
        band = heat_image.resize((width, bottom - top), Image.BILINEAR,
                                 box=(0, top * scale_y, heat_image.width, bottom * scale_y))
        level = np.asarray(band) / peak
        ramp = np.clip(np.stack([3 * level, 3 * level - 1, 3 * level - 2], axis=-1), 0, 1) * 255
        alpha = strength * level[..., None]
        pixels = np.asarray(img.crop((0, top, width, bottom)), dtype=np.float32)
        blended = (1 - alpha) * pixels + alpha * ramp
        out.paste(Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8)), (0, top))
    return out
