"""Scoring a list of images with a model: batched, sharded over ranks, gathered on every rank.

Used by validation during training, `lfm eval` and `lfm predict`, so all three preprocess and score
the same way. Results come batch by batch in input order, so `lfm predict` prints as it goes.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .data import ImageDataset, make_loader
from .errors import CommandFailed, UsageError
from .images import DEFAULT_MAX_PIXELS, TEST_SIZE, check_max_pixels
from .runtime import Context, all_gather, autocast, bar_disabled, compute_dtype, raise_if_interrupted

# Defaults of eval and predict: on a 2-core laptop batches of 16 score faster than larger ones.
DEFAULT_BATCH_SIZE = 16
DEFAULT_WORKERS = 2
# One forward pass sees at most this many pixels (but always one whole image): with --no-resize a
# batch of large images goes through the model a few images at a time, bounding activation memory.
FORWARD_PIXELS = DEFAULT_BATCH_SIZE * TEST_SIZE * TEST_SIZE


def check_loading_options(batch_size: int, workers: int, max_pixels: int):
    """Refuse values of --batch-size, --workers and --max-pixels that cannot work, naming them."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise UsageError(f"--workers must be >= 0, got {workers}")
    check_max_pixels(max_pixels)


@dataclass
class Scores:
    """prob_fake per item (NaN where the item could not be scored) and (index, reason) per failure."""

    prob_fake: np.ndarray
    failures: list


def _forward_chunks(images: torch.Tensor):
    per_image = images.shape[2] * images.shape[3]
    step = max(1, FORWARD_PIXELS // per_image)
    return images.split(step)


def _local_batches(model, loader, ctx: Context, precision: str):
    """(indices, probs, failures) of this rank's batches."""
    dtype = compute_dtype(precision)
    for batch in loader:
        raise_if_interrupted()
        indices, probs, failures = [], [], list(batch.failures)
        for images, _, batch_indices in batch.groups:
            try:
                chunk_probs = []
                for chunk in _forward_chunks(images):
                    with autocast(ctx.device, precision):
                        logits = model(chunk.to(ctx.device, dtype, non_blocking=True))
                    chunk_probs.append(torch.sigmoid(logits.to(dtype)).squeeze(1).cpu())
            except ValueError as err:  # the model's input checks, e.g. an image below its minimum size
                failures += [(int(i), str(err)) for i in batch_indices]
                continue
            indices += batch_indices.tolist()
            probs += torch.cat(chunk_probs).double().tolist()
        yield indices, probs, failures


def scored_in_order(model, items, transform, ctx: Context, *, batch_size: int = DEFAULT_BATCH_SIZE,
                    workers: int = 0, precision: str = "float32", max_pixels: int = DEFAULT_MAX_PIXELS,
                    exif_transpose: bool = False, progress: bool | None = False, desc: str = "scoring"):
    """Yield (index, prob_fake, None) or (index, None, reason) for every item, in input order, on every
    rank, as soon as the batches holding it and every earlier item are done. prob_fake is
    sigmoid(logit) in float32 as the authors compute it (in float64 for precision "float64"). Rank r
    scores items r, r + world_size, ...; the ranks gather after every batch. A NaN score raises
    CommandFailed naming the image."""
    dataset = ImageDataset(items, transform, max_pixels, exif_transpose=exif_transpose)
    loader = make_loader(dataset, range(ctx.rank, len(dataset), ctx.world_size), batch_size, workers,
                         pin_memory=ctx.device.type == "cuda")
    # Every rank takes as many steps as rank 0 (which has the most items), padding with empty batches.
    steps = math.ceil(math.ceil(len(items) / ctx.world_size) / batch_size)
    local = _local_batches(model, loader, ctx, precision)
    done, next_index = {}, 0
    model.eval()
    with torch.no_grad(), tqdm(total=len(items), desc=desc, unit="img", leave=False,
                               disable=bar_disabled(progress, ctx)) as bar:
        for _ in range(steps):
            for indices, probs, failures in all_gather(next(local, ([], [], [])), ctx):
                for index, prob in zip(indices, probs):
                    if math.isnan(prob):
                        raise CommandFailed(f"the model scores NaN for {items[index].path}: its weights or this "
                                            "image give non-finite values")
                    done[index] = (prob, None)
                done.update((index, (None, reason)) for index, reason in failures)
                bar.update(len(indices) + len(failures))
            while next_index in done:
                yield (next_index, *done.pop(next_index))
                next_index += 1


def score_items(model, items, transform, ctx: Context, **options) -> Scores:
    """Every item's probability of being generated (NaN where it could not be scored) and the failures;
    `options` as for scored_in_order."""
    prob_fake, failures = np.full(len(items), np.nan), []
    for index, prob, reason in scored_in_order(model, items, transform, ctx, **options):
        if reason is None:
            prob_fake[index] = prob
        else:
            failures.append((index, reason))
    return Scores(prob_fake, failures)
