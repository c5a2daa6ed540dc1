"""`lfm predict`: the probability that each image is generated, for files, folders and globs.

Preprocessing is the authors' test pipeline (PIL open -> convert('RGB') -> resize to 256x256 bilinear
-> /255 -> ImageNet normalize -> model in eval -> sigmoid), so their checkpoint gives their numbers.
Results are printed (and heatmaps written) as soon as each batch is scored, in input order.
"""
import dataclasses
import json
import os
import sys
from pathlib import Path

from .data import Item, describe_failures, expand_paths
from .engines import DEFAULT_ENGINE, check_engine, prepare
from .errors import UsageError, warn
from .images import DEFAULT_MAX_PIXELS, TEST_SIZE, EvalTransform, read_rgb
from .inference import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, cap_workers, check_loading_options, scored_in_order
from .runtime import compute_dtype, session
from .weights import atomic_write, claim_new_file, load_model, prepare_output_folder

# Tab-separated output: characters that would break a line or a column are written escaped.
_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_field(text: str) -> str:
    return text.translate(_TSV_ESCAPES)


def predict(weights, paths, *, model_name=None, resize=TEST_SIZE, batch_size=DEFAULT_BATCH_SIZE,
            workers=DEFAULT_WORKERS, device="auto", precision="float32", backend="auto",
            max_pixels=DEFAULT_MAX_PIXELS, exif_transpose=False, as_json=False, heatmap_dir=None, progress=None,
            stream=None, engine=DEFAULT_ENGINE):
    """Print one line per readable image as soon as it is scored (tab-separated path, prob_fake and, with
    `heatmap_dir`, the heatmap PNG written for it; or a JSON object with `as_json`) and return the
    results. Raises UsageError when no image could be scored. `engine`: see lfm.engines."""
    stream = stream or sys.stdout
    check_loading_options(batch_size, workers, max_pixels)
    check_engine(engine, resize, precision)
    files = expand_paths(paths)
    workers = cap_workers(workers, len(files), batch_size, "predict")
    if heatmap_dir is not None:
        heatmap_dir = prepare_output_folder(heatmap_dir, "--heatmap")
        refuse_folder_holding_inputs(heatmap_dir, files)
    items = [Item(path) for path in files]
    transform = EvalTransform(resize)
    results, failures = [], []
    with session(device, backend, precision) as ctx:
        model, config = load_model(weights, model_name, backend=backend, command="predict",
                                   dtype=compute_dtype(precision))
        if heatmap_dir is not None and config["model"] != "lfm":
            raise UsageError(f"--heatmap shows LFM's Top-K positions; a {config['model']!r} model has none")
        runner = prepare(model.to(ctx.device), engine, ctx.device, (resize, resize), "predict")
        for index, prob, reason in scored_in_order(runner, items, transform, ctx, batch_size=batch_size,
                                                   workers=workers, precision=precision, max_pixels=max_pixels,
                                                   exif_transpose=exif_transpose, progress=progress,
                                                   desc="predicting"):
            if reason is not None:
                failures.append((index, reason))
                continue
            result = {"path": str(files[index]), "prob_fake": prob}
            if ctx.is_main:
                if heatmap_dir is not None:
                    result["heatmap"] = str(write_heatmap(model, files[index], transform, heatmap_dir, max_pixels,
                                                          exif_transpose))
                fields = [result["path"], f"{prob:.6g}"] + ([result["heatmap"]] if heatmap_dir is not None else [])
                print(json.dumps(result) if as_json else "\t".join(map(tsv_field, fields)), file=stream, flush=True)
            results.append(result)
    if failures and ctx.is_main:
        warn("predict", describe_failures(failures, files))
    if not results:
        raise UsageError(f"no image could be scored among the {len(files)} file(s) given")
    return results if ctx.is_main else []


def refuse_folder_holding_inputs(folder: Path, files):
    """Heatmaps go to a folder that holds none of the inputs, even beneath it: one written there could
    replace an input before it is read, or be scored as an input by the next run."""
    real_folder = Path(os.path.realpath(folder))
    for file in files:
        if real_folder in Path(os.path.realpath(file)).parents:
            raise UsageError(f"--heatmap {folder} holds input images ({file}); choose a folder outside the inputs")


def write_heatmap(model, path: Path, transform, folder: Path, max_pixels, exif_transpose) -> Path:
    """Overlay the Top-K heat of one image on it, at its own size, as folder/<name>.png under a name that
    no file had (<stem>.png, else <stem>_1.png, ...): a heatmap never replaces a file it did not create."""
    from .heatmap import TopKHeat, overlay

    img = read_rgb(path, max_pixels, exif_transpose)
    heat = TopKHeat.of(model, dataclasses.replace(transform, normalize=False)(img).unsqueeze(0))
    target = claim_new_file(folder, path.stem, ".png")
    try:
        atomic_write(target, lambda tmp: overlay(img, heat).save(tmp, format="PNG"))
    except BaseException:
        target.unlink(missing_ok=True)  # our own empty claim
        raise
    return target
