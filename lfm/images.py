"""Reading images and turning them into model inputs exactly as the authors' pipeline does.

Test pipeline (as released): PIL open -> convert('RGB') -> resize to 256x256 bilinear -> /255 ->
ImageNet normalize; a robustness test perturbs the image first (lfm.perturb). Training adds, after the
resize: optional Gaussian blur and JPEG re-compression (the same functions as the test perturbations),
a random crop and a horizontal flip. Every random choice comes from a numpy Generator handed in by
the caller (keyed on seed, epoch and sample index), so results never depend on worker processes.
"""
import dataclasses
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import UsageError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
TEST_SIZE = 256
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own decompression-bomb limit, about 89.5 M pixels
# Pillow refuses to open anything above twice its limit, so no --max-pixels above this can work.
MAX_PIXELS_LIMIT = 2 * Image.MAX_IMAGE_PIXELS
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnusableImage(Exception):
    """A file that cannot serve as an input image; the message says why. Such files are skipped."""


class ImageTooLarge(UnusableImage):
    """An image above the pixel limit (a possible decompression bomb), refused before decoding."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, as the authors do with convert('RGB') (alpha is dropped, not composited).

    16-bit (and 32-bit integer) grayscale is first scaled to 8 bits, since convert would clip it at 255;
    a palette with a transparency entry goes through RGBA so Pillow does not warn.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(img, dtype=np.float64) / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def check_max_pixels(max_pixels: int):
    if not 1 <= max_pixels <= MAX_PIXELS_LIMIT:
        raise UsageError(f"--max-pixels must lie in [1, {MAX_PIXELS_LIMIT}] (Pillow refuses larger images), "
                         f"got {max_pixels}")


def read_rgb(path, max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = False) -> Image.Image:
    """Decode an image file to an RGB PIL image, or raise UnusableImage saying why it cannot be used.

    EXIF orientation is ignored, as in the authors' pipeline, unless `exif_transpose` (then the image
    is turned upright first)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            img = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"refused: {err}") from None
    except Exception as err:  # noqa: BLE001 - any failure to open an untrusted file means "not an image"
        raise UnusableImage(f"not a readable image ({err})") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"refused: {width}x{height} = {width * height} pixels is above the limit of "
                                f"{max_pixels} (a possible decompression bomb{_raise_hint(max_pixels)})")
        try:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img) if exif_transpose else img)
        except Exception as err:  # noqa: BLE001 - truncated or corrupt data
            raise UnusableImage(f"cannot decode ({err})") from None


def _raise_hint(max_pixels: int) -> str:
    return f"; raise it with --max-pixels, up to {MAX_PIXELS_LIMIT}" if max_pixels < MAX_PIXELS_LIMIT else ""


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Resize to size x size with PIL bilinear, which is what torchvision's Resize does on PIL images."""
    return img.resize((size, size), Image.BILINEAR)


def to_input_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ImageNet-normalized float32 (3, H, W), bit for bit as ToTensor + Normalize."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def to_pixel_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> its uint8 (3, H, W) pixels: a quarter of the input's memory, normalized later."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def normalize_pixels(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (..., 3, H, W) pixels -> ImageNet-normalized, bit for bit as to_input_tensor (the same float32
    operations in the same order), then in `dtype` (the model's); a float input is taken as normalized
    already."""
    if x.is_floating_point():
        return x.to(dtype)
    mean, std = IMAGENET_MEAN.to(x.device), IMAGENET_STD.to(x.device)
    return ((x.float() / 255.0 - mean) / std).to(dtype)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    _check_crop(img, size)
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _check_crop(img: Image.Image, size: int):
    if min(img.size) < size:
        raise UnusableImage(f"{img.size[0]}x{img.size[1]} is smaller than the crop size {size}")


@dataclass(frozen=True)
class EvalTransform:
    """Deterministic preprocessing: optional resize to a square, optional center crop; `perturbation`
    (a function of the image, see lfm.perturb) is applied to the loaded image before them. The normalized
    input, or with `normalize=False` its uint8 pixels (normalize_pixels gives the same input from them)."""

    resize: int | None = TEST_SIZE
    crop: int | None = None
    perturbation: object = None
    normalize: bool = True

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        if self.perturbation is not None:
            img = self.perturbation(img)
        if self.resize:
            img = resize_square(img, self.resize)
        if self.crop:
            img = center_crop(img, self.crop)
        return to_input_tensor(img) if self.normalize else to_pixel_tensor(img)


@dataclass(frozen=True)
class TrainTransform:
    """Training preprocessing: resize -> (blur, JPEG) -> random crop -> random flip. Its settings and their
    defaults (the released recipe) are the fields of the same names of lfm.train.TrainOptions."""

    resize: int | None
    crop: int | None
    flip: bool
    blur_prob: float
    blur_sigma: tuple
    jpeg_prob: float
    jpeg_quality: tuple

    @classmethod
    def from_options(cls, options) -> "TrainTransform":
        """The transform of a run's options (any object with these fields, a TrainOptions in practice)."""
        return cls(**{field.name: getattr(options, field.name) for field in dataclasses.fields(cls)})

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        if self.resize:
            img = resize_square(img, self.resize)
        if rng.random() < self.blur_prob:
            img = gaussian_blur(img, rng.uniform(*self.blur_sigma))
        if rng.random() < self.jpeg_prob:
            img = jpeg_roundtrip(img, int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)))
        if self.crop:
            _check_crop(img, self.crop)
            left = int(rng.integers(0, img.size[0] - self.crop + 1))
            top = int(rng.integers(0, img.size[1] - self.crop + 1))
            img = img.crop((left, top, left + self.crop, top + self.crop))
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_input_tensor(img)


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    """Compress to JPEG at `quality` and decode again (PIL's default 4:2:0 chroma subsampling)."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur of each channel as scipy.ndimage.gaussian_filter computes it (the blur of the
    CNNDetection and NPR trainers and of the robustness benchmarks): kernel truncated at 4 sigma, edges
    mirrored (abc|cba), in float64, rounded back to 8 bits."""
    if sigma == 0:
        return img
    radius = int(4 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.asarray(img, dtype=np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        size = out.shape[axis]
        out = sum(weight * padded.take(np.arange(i, i + size), axis=axis) for i, weight in enumerate(kernel))
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def downscale_upscale(img: Image.Image, scale: float) -> Image.Image:
    """Resize by `scale` (at least 1 pixel a side) and back to the original size, both bilinear."""
    width, height = img.size
    small = img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    return small.resize((width, height), Image.BILINEAR)
