"""Perturbations of test images (robustness sweeps) and their use as training augmentation.

As the robustness benchmarks define them, applied to the loaded image before preprocessing:
  jpeg:Q       JPEG re-compression at quality Q (1-100; PIL, 4:2:0 chroma)
  blur:SIGMA   Gaussian blur of standard deviation SIGMA pixels (scipy's gaussian_filter, as CNNDetection)
  resize:SCALE resize by SCALE (0 < SCALE <= 1) and back to the original size, both bilinear
  crop:SIZE    center crop to SIZE x SIZE (an image smaller than that is skipped, with its reason)
Each is a function of the image alone, so a perturbed image does not depend on batching or workers.
A sweep names several severities of one kind, `jpeg:95,75,50`. Training augmentation
(`lfm train --aug blur:0.1,jpg:0.1`) applies blur and JPEG with those probabilities, drawing the
severity from --blur-sigma and --jpeg-quality, through the same functions (lfm.images.TrainTransform).
"""
import math
from dataclasses import dataclass

from .errors import UsageError
from .images import center_crop, downscale_upscale, gaussian_blur, jpeg_roundtrip

ALIASES = {"jpg": "jpeg"}
# kind -> (parse a severity, what it must be, the function of (image, severity))
KINDS = {
    "jpeg": (int, "an integer quality in [1, 100]", lambda q: 1 <= q <= 100, jpeg_roundtrip),
    "blur": (float, "a sigma > 0 in pixels", lambda s: 0 < s < math.inf, gaussian_blur),
    "resize": (float, "a scale in (0, 1]", lambda s: 0 < s <= 1, downscale_upscale),
    "crop": (int, "a size >= 1 in pixels", lambda s: s >= 1, center_crop),
}
SEVERITY_NAMES = {"jpeg": "quality", "blur": "sigma", "resize": "scale", "crop": "size"}
AUGMENTATIONS = ("blur", "jpeg")  # what training applies with a probability (the trainers' blur_prob, jpg_prob)
SPEC_HELP = "KIND:S1[,S2...] with KIND one of " + ", ".join(KINDS)


@dataclass(frozen=True)
class Perturbation:
    kind: str
    severity: float

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.severity:g}"

    def __call__(self, img):
        return KINDS[self.kind][3](img, self.severity)


def _kind(text: str, option: str, allowed) -> str:
    kind = ALIASES.get(text.strip().lower(), text.strip().lower())
    if kind not in allowed:
        raise UsageError(f"{option}: unknown kind {text.strip()!r}; expected one of {', '.join(allowed)}")
    return kind


def parse_sweep(spec: str, option: str = "--perturb") -> list[Perturbation]:
    """'jpeg:95,75,50' -> the three perturbations, or a UsageError naming the bad part."""
    kind, colon, values = str(spec).partition(":")
    if not colon or not values.strip():
        raise UsageError(f"{option} {spec!r}: expected {SPEC_HELP}")
    kind = _kind(kind, f"{option} {spec!r}", KINDS)
    cast, expected, fits, _ = KINDS[kind]
    perturbations = []
    for text in values.split(","):
        try:
            severity = cast(text.strip())
        except ValueError:
            severity = None
        if severity is None or not fits(severity):
            raise UsageError(f"{option} {spec!r}: {kind} takes {expected}, got {text.strip()!r}")
        perturbations.append(Perturbation(kind, severity))
    return perturbations


def parse_sweeps(specs) -> list[Perturbation]:
    """Every severity of every spec, in order, each once."""
    perturbations = []
    for spec in specs or ():
        for perturbation in parse_sweep(spec):
            if perturbation in perturbations:
                raise UsageError(f"--perturb: {perturbation.name} is given twice")
            perturbations.append(perturbation)
    return perturbations


def parse_augmentation(spec: str) -> dict:
    """'blur:0.1,jpg:0.1' (lfm train --aug) -> {'blur_prob': 0.1, 'jpeg_prob': 0.1}: the TrainOptions fields it
    sets; a UsageError naming the bad part."""
    probabilities = {}
    for part in str(spec).split(","):
        kind, colon, value = part.partition(":")
        if not colon:
            raise UsageError(f"{spec!r}: expected KIND:PROBABILITY[,KIND:PROBABILITY], KIND one of "
                             f"{', '.join(AUGMENTATIONS)} (jpg = jpeg)")
        kind = _kind(kind, repr(spec), AUGMENTATIONS)
        try:
            probability = float(value)
        except ValueError:
            probability = math.nan
        if not 0 <= probability <= 1:
            raise UsageError(f"{spec!r}: the probability of {kind} must lie in [0, 1], got {value.strip()!r}")
        if f"{kind}_prob" in probabilities:
            raise UsageError(f"{spec!r}: {kind} is given twice")
        probabilities[f"{kind}_prob"] = probability
    return probabilities
