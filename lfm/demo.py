"""`lfm demo` (and `make demo`): a seeded, offline experiment that runs in a few minutes on a CPU.

Real images are photographs that ship inside scikit-image, scikit-learn and matplotlib, box-downscaled
by 2 (JPEG's 4:2:0 chroma subsampling leaves a 2x2 trace otherwise) and cut into random crops. Each
fake is one of those crops box-downscaled by 2 again and upsampled back by a generator: nearest,
bilinear, bicubic, a transposed conv or a pixel shuffle with random weights, or zero insertion + blur.
Those fakes are blurrier than the reals; the last test subset, sharp_patch, is not: a quarter of each
real crop is re-upsampled and sharpened back to the detail of what it replaces, so the only evidence is
a local upsampling trace. Both classes are saved as PNG in the CNNDetection layout, split by source
photo. LFM, its GAP ablation and NPR are trained with the same trainer on three generators and tested on
all seven subsets, four held out.

The table is the same, to its printed digits, on any x86 CPU and thread count. In float32 it is not:
convolutions, matrix products and reductions sum in an order that depends on the instruction set
(oneDNN, MKL and ATen pick AVX-512, AVX2 or scalar kernels) and on the threads, and a few hundred Adam
steps grow those last-bit differences into points of accuracy; even the initial weights, drawn in
float32, differ in their last bit between ATen's vectorized and scalar random-number kernels. So the
fakes are computed, and the models drawn, trained and tested, in float64 on the torch backend: the
same differences start 9 digits lower and stay far below the printed ones (the trained weights agreed
to about 1e-10 across instruction sets and thread counts). It costs about 1.7x the float32 time here.
"""
import csv
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .evaluate import evaluate
from .train import LAST_WEIGHTS, TrainOptions, check_seed, train
from .weights import load_model, write_json

TRAIN_GENERATORS = ("nearest", "bilinear", "transposed_conv")
HELD_OUT_GENERATORS = ("bicubic", "pixel_shuffle", "zero_insert_blur", "sharp_patch")
DEMO_MODELS = ("lfm", "lfm-gap", "npr")
CROP_SIZE = 64  # SNet leaves 6x6 positions: K = 16 still has to choose
DEFAULT_CROPS_PER_PHOTO = 24
DEFAULT_EPOCHS = 3
DEMO_LR, DEMO_BATCH = 1e-3, 16  # ten times the recipe's rate, half its batch: the demo has ~100 steps, not ~100k
TEST_PHOTOS, VAL_PHOTOS = 6, 3
MIN_CROP_STD = 6.0  # flat crops (black borders, night sky) look the same real or upsampled


# ---------------------------------------------------------------------------------------------
# Real photographs that load offline
# ---------------------------------------------------------------------------------------------
def _skimage(name):
    def load():
        from skimage import data

        return [getattr(data, name)()]

    return load


def _stereo_motorcycle():
    from skimage import data

    left, right, _ = data.stereo_motorcycle()
    return [left, right]  # one scene: both views stay in one split


def _sklearn_samples(index):
    def load():
        from sklearn.datasets import load_sample_images

        return [load_sample_images().images[index]]

    return load


def _grace_hopper():
    from matplotlib import cbook

    return [np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))]


PHOTO_SOURCES = {
    **{name: _skimage(name) for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                                         "immunohistochemistry", "retina", "camera", "coins", "moon", "brick",
                                         "grass", "gravel", "cell", "clock", "page", "text")},
    "motorcycle": _stereo_motorcycle, "china": _sklearn_samples(0), "flower": _sklearn_samples(1),
    "grace_hopper": _grace_hopper,
}


def as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def box_downscale(image: np.ndarray) -> np.ndarray:
    """Mean of each 2x2 block, HxWx3 uint8 -> (H//2)x(W//2)x3 uint8."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2, -1)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def random_crops(photos, count: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` crops of size x size from random places of random photos, skipping flat ones."""
    crops = []
    while len(crops) < count:
        photo = photos[rng.integers(len(photos))]
        top, left = rng.integers(photo.shape[0] - size + 1), rng.integers(photo.shape[1] - size + 1)
        crop = photo[top:top + size, left:left + size]
        if crop.astype(np.float64).std() >= MIN_CROP_STD:
            crops.append(crop)
    return crops


# ---------------------------------------------------------------------------------------------
# Upsamplers: (1, 3, h, w) float64 in [0, 255] -> (1, 3, 2h, 2w)
# ---------------------------------------------------------------------------------------------
def _interpolate(mode):
    def upsample(low, rng):
        return F.interpolate(low, scale_factor=2, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))

    return upsample


def _jitter(base: np.ndarray, rng, spread: float = 0.4) -> np.ndarray:
    """Random positive weights around `base`: every tap nonzero, each scaled by exp(N(0, spread))."""
    return (base + 0.05) * np.exp(rng.normal(0.0, spread, base.shape))


def _transposed_conv(low, rng):
    """Depthwise 4x4/2 transposed conv with random weights around bilinear's, each output phase
    normalized to unit gain (the response to a constant image), so only the filter shape varies."""
    taps = np.array([0.25, 0.75, 0.75, 0.25])
    weight = torch.tensor(np.stack([_jitter(np.outer(taps, taps), rng) for _ in range(3)]),
                          dtype=low.dtype)[:, None]
    up = F.conv_transpose2d(low, weight, stride=2, padding=1, groups=3)
    return up / F.conv_transpose2d(torch.ones_like(low), weight, stride=2, padding=1, groups=3)


def _pixel_shuffle(low, rng):
    """3x3 conv to 4 sub-pixels per channel (random weights around bilinear's phases, each summing to 1)
    followed by a 2x pixel shuffle."""
    phases = (np.array([0.25, 0.75, 0.0]), np.array([0.0, 0.75, 0.25]))
    kernels = []
    for _ in range(3):
        for row in phases:
            for col in phases:
                kernel = _jitter(np.outer(row, col), rng)
                kernels.append(kernel / kernel.sum())
    weight = torch.tensor(np.stack(kernels), dtype=low.dtype)[:, None]  # (3 * 4, 1, 3, 3)
    return F.pixel_shuffle(F.conv2d(F.pad(low, (1, 1, 1, 1), mode="replicate"), weight, groups=3), 2)


def _gaussian_blur(image, sigma: float):
    """Separable Gaussian blur (7 taps, reflected borders) of a (1, 3, H, W) image."""
    x = torch.arange(-3, 4, dtype=image.dtype)
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).repeat(3, 1)
    image = F.conv2d(F.pad(image, (3, 3, 0, 0), mode="reflect"), g.view(3, 1, 1, 7), groups=3)
    return F.conv2d(F.pad(image, (0, 0, 3, 3), mode="reflect"), g.view(3, 1, 7, 1), groups=3)


def _zero_insert_blur(low, rng):
    """Zeros between the pixels (x4 to keep the mean), then a Gaussian blur with a random sigma."""
    up = torch.zeros(low.shape[0], low.shape[1], 2 * low.shape[2], 2 * low.shape[3], dtype=low.dtype)
    up[..., ::2, ::2] = 4 * low
    return _gaussian_blur(up, rng.uniform(0.9, 1.3))


# ---------------------------------------------------------------------------------------------
# Generators: HxWx3 uint8 real crop -> HxWx3 uint8 fake
# ---------------------------------------------------------------------------------------------
def _as_tensor(image: np.ndarray) -> torch.Tensor:
    # float64: results land on uint8 rounding boundaries (.5) far less often than float32's last-bit
    # differences between instruction sets would move them, so the PNGs are the same on every CPU
    return torch.from_numpy(image).permute(2, 0, 1)[None].to(torch.float64)


def _as_uint8(image: torch.Tensor) -> np.ndarray:
    return np.clip(np.rint(image[0].permute(1, 2, 0).numpy()), 0, 255).astype(np.uint8)


def _reupsampled(upsample):
    """The whole crop box-downscaled by 2 and upsampled back: blurrier than the real crop."""
    def generate(crop, rng):
        return _as_uint8(upsample(_as_tensor(box_downscale(crop)), rng))

    return generate


def _laplacian(image: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian of an HxWxC float64 image over its interior."""
    return (4 * image[1:-1, 1:-1] - image[:-2, 1:-1] - image[2:, 1:-1] - image[1:-1, :-2]
            - image[1:-1, 2:])


def high_frequency_energy(image: np.ndarray) -> float:
    """Mean squared Laplacian of an HxWx3 image: how much fine detail it holds (blur lowers it)."""
    return float((_laplacian(image.astype(np.float64)) ** 2).mean())


def sharpened_to(image: torch.Tensor, detail: float) -> torch.Tensor:
    """Unsharp mask image + a * (image - blur(image)) of a (1, 3, H, W) image, with the a >= 0 that makes
    its high-frequency energy `detail` (before rounding; a = 0 when it already holds as much)."""
    high = image - _gaussian_blur(image, 1.0)
    h, d = (_laplacian(t[0].permute(1, 2, 0).numpy()) for t in (image, high))
    # energy(a) = mean((h + a d)^2) = (h.h) + 2a (h.d) + a^2 (d.d): the larger root of energy(a) = detail
    hh, hd, dd = (float((u * v).mean()) for u, v in ((h, h), (h, d), (d, d)))
    if hh >= detail or dd == 0:
        return image
    return image + (-hd + np.sqrt(hd * hd - dd * (hh - detail))) / dd * high


def _sharp_patch(upsample):
    """A square of half the crop's side (a quarter of its area, at an even offset) box-downscaled by 2,
    upsampled back and sharpened to the detail of the real square it replaces: the fake is no blurrier
    than the real, and its only trace is local."""
    def generate(crop, rng):
        side = min(crop.shape[:2]) // 4 * 2
        top, left = (2 * rng.integers((n - side) // 2 + 1) for n in crop.shape[:2])
        real = crop[top:top + side, left:left + side]
        up = upsample(_as_tensor(box_downscale(real)), rng)
        fake = crop.copy()
        fake[top:top + side, left:left + side] = _as_uint8(sharpened_to(up, high_frequency_energy(real)))
        return fake

    return generate


GENERATORS = {
    "nearest": _reupsampled(_interpolate("nearest")), "bilinear": _reupsampled(_interpolate("bilinear")),
    "bicubic": _reupsampled(_interpolate("bicubic")), "transposed_conv": _reupsampled(_transposed_conv),
    "pixel_shuffle": _reupsampled(_pixel_shuffle), "zero_insert_blur": _reupsampled(_zero_insert_blur),
    "sharp_patch": _sharp_patch(_interpolate("bicubic")),
}


def make_fake(crop: np.ndarray, generator: str, rng: np.random.Generator) -> np.ndarray:
    """A fake of a real HxWx3 uint8 crop by `generator` (a name of GENERATORS): HxWx3 uint8."""
    return GENERATORS[generator](crop, rng)


# ---------------------------------------------------------------------------------------------
# Dataset and experiment
# ---------------------------------------------------------------------------------------------
def _save_png(image: np.ndarray, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def split_photos(names, rng) -> dict[str, list[str]]:
    """Source photos -> test / val / train, so no photo lends crops to two splits."""
    names = [str(name) for name in rng.permutation(sorted(names))]
    return {"test": names[:TEST_PHOTOS], "val": names[TEST_PHOTOS:TEST_PHOTOS + VAL_PHOTOS],
            "train": names[TEST_PHOTOS + VAL_PHOTOS:]}


def build_dataset(root: Path, crops_per_photo: int, seed: int, size: int = CROP_SIZE,
                  sources: dict = PHOTO_SOURCES) -> dict:
    """Write root/{train,val}/{0_real,1_fake} (fakes from the training generators, one per real crop,
    taking turns) and root/test/<generator>/{0_real,1_fake} for all six (the same real crops in each).
    Returns the photo split."""
    rng = np.random.default_rng(seed)
    splits = split_photos(sources, rng)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny convs: thread start-up would cost more than the work
    try:
        _write_crops(root, splits, crops_per_photo, size, sources, rng)
    finally:
        torch.set_num_threads(threads)
    return splits


def _write_crops(root, splits, crops_per_photo, size, sources, rng):
    for split, names in splits.items():
        for name in names:
            photos = [box_downscale(as_rgb(np.asarray(photo))) for photo in sources[name]()]
            for i, crop in enumerate(random_crops(photos, crops_per_photo, size, rng)):
                stem = f"{name}_{i:03d}"
                if split == "test":
                    for generator in GENERATORS:
                        _save_png(crop, root / split / generator / "0_real" / f"{stem}.png")
                        _save_png(make_fake(crop, generator, rng), root / split / generator / "1_fake" / f"{stem}.png")
                else:
                    generator = TRAIN_GENERATORS[i % len(TRAIN_GENERATORS)]
                    _save_png(crop, root / split / "0_real" / f"{stem}.png")
                    _save_png(make_fake(crop, generator, rng), root / split / "1_fake" / f"{stem}_{generator}.png")


def run_demo(out="demo_out", seed: int = 0, epochs: int | None = None, crops_per_photo: int | None = None,
             progress=None, log=print) -> dict:
    """Build the data, train the three models, test them; print and write the table and a plot."""
    check_seed(seed)  # before the data set is built
    started = time.perf_counter()
    out = Path(out)
    epochs = epochs or DEFAULT_EPOCHS
    crops_per_photo = crops_per_photo or DEFAULT_CROPS_PER_PHOTO
    data = out / "data"
    for folder in (data, out / "runs", out / "eval"):  # our own outputs of an earlier demo
        shutil.rmtree(folder, ignore_errors=True)
    splits = build_dataset(data, crops_per_photo, seed)
    log(f"data: {CROP_SIZE}x{CROP_SIZE} PNG crops in {data}; photos by split: "
        + "; ".join(f"{split} {', '.join(names)}" for split, names in splits.items()))
    log(f"training generators: {', '.join(TRAIN_GENERATORS)}; held out: {', '.join(HELD_OUT_GENERATORS)}")
    train_images = sum(1 for _ in (data / "train").rglob("*.png"))

    results, speed = {}, {}
    for model in DEMO_MODELS:
        log(f"\n== {model} ==")
        run_dir = out / "runs" / model
        # float64 on the torch backend and the CPU: the same table on every machine (see the module's doc)
        common = {"device": "cpu", "backend": "torch", "precision": "float64", "workers": 0, "progress": progress}
        clock = time.perf_counter()
        train(TrainOptions(data=str(data), out=str(run_dir), model=model, epochs=epochs, lr=DEMO_LR,
                           batch_size=DEMO_BATCH, resize=None, crop=None, patience=0, seed=seed, **common), log=log)
        train_seconds, clock = time.perf_counter() - clock, time.perf_counter()
        # A fixed short schedule, tested as it ends: three validation photos are too few to pick an epoch.
        report = evaluate(run_dir / LAST_WEIGHTS, [data / "test"], resize=None, out=out / "eval" / model,
                          log=lambda *args: None, **common)
        test_seconds = time.perf_counter() - clock
        results[model] = report["subsets"] | {"mean": report["mean"]}
        speed[model] = {"parameters": parameter_count(run_dir / LAST_WEIGHTS),
                        "train_images_per_s": epochs * train_images / train_seconds,
                        "test_images_per_s": report["mean"]["n"] / test_seconds}

    log("\n" + demo_table(results))
    log("\n" + speed_table(speed, epochs))
    write_results(out, results, speed, splits, epochs, crops_per_photo, seed)
    log(f"\nresults: {out / 'results.csv'}, {out / 'results.json'}, {out / 'results.png'}; "
        f"{time.perf_counter() - started:.0f}s in all")
    return results


def parameter_count(weights: Path) -> int:
    model, _ = load_model(weights, command="demo")
    return sum(p.numel() for p in model.parameters())


def demo_table(results: dict) -> str:
    """Accuracy and AP (percent) per test subset, one column pair per model; held-out subsets marked *;
    the mean over all subsets."""
    rows = [f"{generator}{'*' if generator in HELD_OUT_GENERATORS else ''}" for generator in GENERATORS] + ["mean"]
    keys = list(GENERATORS) + ["mean"]
    columns = "".join(f"{model + ' acc':>12}{model + ' AP':>12}" for model in results)
    header = f"{'generator (* held out)':<24}" + columns
    lines = [header, "-" * len(header)]
    for label, key in zip(rows, keys):
        cells = "".join(f"{100 * r[key]['acc']:12.1f}{100 * r[key]['ap']:12.1f}" for r in results.values())
        lines.append(f"{label:<24}{cells}")
    return "\n".join(lines)


def speed_table(speed: dict, epochs: int) -> str:
    """Parameters and images per second per model; the speeds are this machine's, unlike the table above."""
    header = f"{'model':<10}{'parameters':>12}{'train img/s':>14}{'test img/s':>13}"
    lines = [header, "-" * len(header)]
    lines += [f"{model:<10}{row['parameters']:>12,}{row['train_images_per_s']:>14.1f}{row['test_images_per_s']:>13.1f}"
              for model, row in speed.items()]
    lines.append(f"speeds on this machine, float64, {torch.get_num_threads()} threads; training: {epochs} epochs "
                 "with their validation, test: all subsets")
    return "\n".join(lines)


def write_results(out: Path, results: dict, speed: dict, splits: dict, epochs: int, crops_per_photo: int,
                  seed: int):
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "generator", "held_out", "n", "acc", "ap", "real_acc", "fake_acc"])
        for model, rows in results.items():
            for generator, row in rows.items():
                writer.writerow([model, generator, generator in HELD_OUT_GENERATORS, row["n"], row["acc"], row["ap"],
                                 row["real_acc"], row["fake_acc"]])
    write_json(out / "results.json", {"seed": seed, "epochs": epochs, "crops_per_photo": crops_per_photo,
                                      "crop_size": CROP_SIZE, "lr": DEMO_LR, "batch_size": DEMO_BATCH, "photos": splits,
                                      "train_generators": TRAIN_GENERATORS, "results": results, "speed": speed})
    plot_results(results, out / "results.png")


def plot_results(results: dict, path: Path):
    """Grouped bars of accuracy and AP per test generator and model; held-out generators shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generators = list(GENERATORS)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    width = 0.8 / len(results)
    for ax, metric in zip(axes, ("acc", "ap")):
        for i, generator in enumerate(generators):
            if generator in HELD_OUT_GENERATORS:
                ax.axvspan(i - 0.45, i + 0.45, color="0.92", zorder=0)
        for j, (model, rows) in enumerate(results.items()):
            xs = np.arange(len(generators)) + (j - (len(results) - 1) / 2) * width
            ax.bar(xs, [100 * rows[g][metric] for g in generators], width, label=model, zorder=2)
        ax.set_xticks(range(len(generators)), [g.replace("_", "\n") for g in generators], fontsize=8)
        ax.set_title({"acc": "accuracy (%)", "ap": "average precision (%)"}[metric] + "; shaded: held out")
        ax.set_ylim(0, 100)
        ax.axhline(50, color="0.5", linewidth=0.8, linestyle="--")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(results))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
