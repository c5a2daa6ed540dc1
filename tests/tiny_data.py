"""Tiny generated image sets for the command-line tests: real = uniform noise (no 2x2 structure),
fake = half-size noise upsampled by nearest (a perfect 2x2 trace), so a detector can learn them fast."""
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 48  # LFM's minimum for K = 16 is 47


def real_image(rng, size=SIZE):
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def fake_image(rng, size=SIZE):
    half = rng.integers(0, 256, (size // 2, size // 2, 3), dtype=np.uint8)
    return half.repeat(2, axis=0).repeat(2, axis=1)


def write_labeled(folder: Path, n_real: int, n_fake: int, rng, size=SIZE):
    """folder/0_real/*.png and folder/1_fake/*.png."""
    for name, n, make in (("0_real", n_real, real_image), ("1_fake", n_fake, fake_image)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(make(rng, size)).save(folder / name / f"{i:03d}.png")


def write_training_set(root: Path, classes=("car", "cat"), n_train=8, n_val=4, seed=0, size=SIZE) -> Path:
    """root/{train,val}/<class>/{0_real,1_fake} with n per class and label."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in classes:
            write_labeled(root / split / cls, n, n, rng, size)
    return root
