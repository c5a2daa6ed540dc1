"""Command line: `lfm <command>` (also `python -m lfm`)."""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .model import LFM

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "lfm_official" / "bs_model.pth"


def _preprocess(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> normalized (3, 256, 256), as the authors' test pipeline (bilinear resize to 256)."""
    from PIL import Image

    img = Image.fromarray(rgb).convert("RGB").resize((256, 256), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def demo(args) -> int:
    """Score scikit-image's sample photos (all real) with the authors' checkpoint when it is at hand."""
    from skimage import data

    model = LFM().eval()
    weights = Path(args.weights)
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
        print(f"weights: {weights}")
    else:
        print(f"weights: none found at {weights}; scoring with an untrained model")
    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]
    batch = torch.stack([_preprocess(getattr(data, n)()) for n in names])
    with torch.no_grad():
        probs = torch.sigmoid(model(batch)).squeeze(1)
    for name, p in zip(names, probs.tolist()):
        print(f"{name:22s} prob_fake={p:.4f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lfm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="score sample photos that ship with scikit-image")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"lfm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
