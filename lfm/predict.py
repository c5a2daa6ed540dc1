"""`lfm predict`: the probability that each image is generated, for files, folders and globs.

Preprocessing is the authors' test pipeline (PIL open -> convert('RGB') -> resize to 256x256 bilinear
-> /255 -> ImageNet normalize -> model in eval -> sigmoid), so their checkpoint gives their numbers.
"""
import json
import sys
from pathlib import Path

import numpy as np

from .data import Item, describe_failures, expand_paths
from .errors import UsageError, warn
from .heatmap import overlay, topk_heat
from .images import DEFAULT_MAX_PIXELS, TEST_SIZE, EvalTransform, read_rgb
from .inference import score_items
from .runtime import session
from .weights import atomic_write, load_model


def predict(weights, paths, *, model_name=None, resize=TEST_SIZE, batch_size=64, workers=2, device="auto",
            precision="float32", backend="auto", max_pixels=DEFAULT_MAX_PIXELS, as_json=False, heatmap_dir=None,
            progress=None, stream=None):
    """Print one line per readable image (tab-separated path and prob_fake, or a JSON object with
    `as_json`) and return the results; with `heatmap_dir`, also write a Top-K heatmap PNG per image."""
    stream = stream or sys.stdout
    files = expand_paths(paths)
    items = [Item(path) for path in files]
    transform = EvalTransform(resize)
    with session(device) as ctx:
        model, config = load_model(weights, model_name, backend=backend)
        if heatmap_dir is not None and config["model"] != "lfm":
            raise UsageError(f"--heatmap shows LFM's Top-K positions; a {config['model']!r} model has none")
        model.to(ctx.device)
        scores = score_items(model, items, transform, ctx, batch_size=batch_size, workers=workers,
                             precision=precision, max_pixels=max_pixels, progress=progress, desc="predicting")
    if not ctx.is_main:
        return []
    results = []
    heatmap_names = set()
    for item, prob in zip(items, scores.prob_fake):
        if np.isnan(prob):
            continue
        result = {"path": str(item.path), "prob_fake": float(prob)}
        if heatmap_dir is not None:
            result["heatmap"] = str(write_heatmap(model, item.path, transform, Path(heatmap_dir), heatmap_names,
                                                  ctx.device, max_pixels))
        results.append(result)
        print(json.dumps(result) if as_json else f"{result['path']}\t{prob:.6g}", file=stream, flush=True)
    if scores.failures:
        warn("predict", describe_failures(scores.failures, files))
    return results


def write_heatmap(model, path: Path, transform, folder: Path, taken: set, device, max_pixels) -> Path:
    """Overlay the Top-K heat of one image on it, at its own size, as folder/<name>.png (names made unique)."""
    img = read_rgb(path, max_pixels)
    heat = topk_heat(model, transform(img).unsqueeze(0).to(device))
    name, n = path.stem, 1
    while name in taken:
        name, n = f"{path.stem}_{n}", n + 1
    taken.add(name)
    target = folder / f"{name}.png"
    atomic_write(target, lambda tmp: overlay(img, heat).save(tmp, format="PNG"))
    return target
