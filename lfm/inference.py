"""Scoring a list of images with a model: batched, sharded over ranks, gathered on every rank.

Used by validation during training, `lfm eval` and `lfm predict`, so all three preprocess and score
the same way. Results come batch by batch in input order, so `lfm predict` prints as it goes.
"""
import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from lfm_kernels import snet_head

from .data import ImageDataset, make_loader
from .errors import CommandFailed, UsageError, warn
from .images import DEFAULT_MAX_PIXELS, TEST_SIZE, check_max_pixels, normalize_pixels
from .model import LFM, snet_output_size
from .runtime import Context, all_gather, autocast, bar_disabled, compute_dtype, raise_if_interrupted

# SNet's geometry: grid position (i, j) sees input pixels [8i, 8i + 22] x [8j, 8j + 22]. Working back from
# block 4, each 2x2 conv widens the window by one step of the current stride and each 2x2/2 max-pool widens
# it by one step and doubles the stride (1 -> 2 -> 4 -> 8); the residual of a pixel only reads its own 2x2
# cell, which the window already holds since 8i is even.
RECEPTIVE_FIELD = 23
STRIDE = 8

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


# A rough upper bound on what one loading worker adds at the default settings (its own Python heap and
# decoded images, two batches of 16 256x256 inputs in flight; the model's pages are shared with the parent).
WORKER_BYTES = 256 << 20


def available_memory() -> int | None:
    """Bytes of memory available to new processes (MemAvailable), or None where it cannot be told."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cap_workers(workers: int, n_items: int, batch_size: int, command: str) -> int:
    """--workers clamped to what can help: at most one per batch this process loads, one per core and
    as many as available memory holds (cores and memory shared by the processes of this machine under
    torchrun). A value above what the cores or the memory allow is reported in one warning line; fewer
    batches than workers (a few images) just start fewer."""
    world, local = (int(os.environ.get(name, "1")) for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    cores = len(os.sched_getaffinity(0))
    resources = {f"{cores} core(s)": max(1, cores // local)}
    memory = available_memory()
    if memory is not None:
        fits = memory // local // WORKER_BYTES
        resources[f"memory for {fits}"] = fits
    batches = math.ceil(math.ceil(n_items / world) / batch_size)
    limits = {**resources, f"{n_items} image(s) make {batches} batch(es) of {batch_size}": batches}
    reason, limit = min(limits.items(), key=lambda item: item[1])
    if workers > min(resources.values()):
        warn(command, f"--workers {workers} is more than can help here; using {limit} ({reason})")
    return min(workers, limit)


@dataclass
class Scores:
    """prob_fake per item (NaN where the item could not be scored) and (index, reason) per failure."""

    prob_fake: np.ndarray
    failures: list


def _forward_chunks(images: torch.Tensor):
    per_image = images.shape[2] * images.shape[3]
    step = max(1, FORWARD_PIXELS // per_image)
    return images.split(step)


def _tile_spans(n: int, step: int):
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def lfm_topk(model: LFM, x: torch.Tensor, max_pixels: int | None = None):
    """(values, positions) of an LFM's Top-K in eval mode, each (B, 64, K): per score channel the K largest
    scores over the whole SNet grid (descending, ties to the lower position, as the model's own Top-K) and
    their flat positions i * w + j on that (h, w) grid. `x` is a (B, 3, H, W) input, normalized or as
    uint8 pixels (normalized a tile at a time), on any device; the model runs on its own.

    An image above `max_pixels` (over the batch; FORWARD_PIXELS by default) goes through the model in tiles,
    which keeps memory bounded at any image size and gives exactly the untiled scores: grid position (i, j)
    depends only on input pixels [8i, 8i + 22] x [8j, 8j + 22] (RECEPTIVE_FIELD), so the grid is cut into
    blocks of positions and each block is scored from the input rectangle its positions see. Blocks start at
    multiples of 8 pixels, where the residual's 2x2 anchors and the three 2x2 pools of the whole image fall,
    and every position belongs to one block; the Top-K of the whole grid is then the Top-K of the blocks'
    Top-K."""
    device = model.covn1_1.weight.device
    model.check_input(torch.empty(x.shape, device="meta"))
    h, w = snet_output_size(*x.shape[2:])
    budget = max(1, (max_pixels or FORWARD_PIXELS) // len(x))
    if x.shape[2] * x.shape[3] <= budget:
        return _block_topk(model, normalize_pixels(x.to(device), model.fc1.weight.dtype), model.k)
    # Blocks of bh x bw positions read (8 bh + 15) x (8 bw + 15) pixels: square-ish, or full rows when narrow.
    side = max(1, (math.isqrt(budget) - RECEPTIVE_FIELD + STRIDE) // STRIDE)
    bw = min(w, side)
    bh = min(h, max(1, (budget // (STRIDE * bw + RECEPTIVE_FIELD - STRIDE) - RECEPTIVE_FIELD + STRIDE) // STRIDE))
    values, positions = [], []
    for top, bottom in _tile_spans(h, bh):
        for left, right in _tile_spans(w, bw):
            rows = slice(STRIDE * top, STRIDE * (bottom - 1) + RECEPTIVE_FIELD)
            cols = slice(STRIDE * left, STRIDE * (right - 1) + RECEPTIVE_FIELD)
            tile = normalize_pixels(x[:, :, rows, cols].to(device), model.fc1.weight.dtype)
            k = min(model.k, (bottom - top) * (right - left))
            tile_values, tile_positions = _block_topk(model, tile, k)
            row, col = tile_positions.div(right - left, rounding_mode="floor"), tile_positions % (right - left)
            values.append(tile_values)
            positions.append((top + row) * w + left + col)
    return merge_topk(values, positions, model.k)


def merge_topk(values: list, positions: list, k: int):
    """The Top-K (values, positions) of a grid from the Top-K candidates of disjoint blocks of it, (B, C, *)
    each with global positions: the largest first, NaN largest, ties to the lower position."""
    values, positions = torch.cat(values, dim=2), torch.cat(positions, dim=2)
    # Candidates in position order, then a stable sort by value: ties keep the lower position first.
    positions, order = positions.sort(dim=2)
    values, order = values.gather(2, order).sort(dim=2, descending=True, stable=True)
    return values[..., :k], positions.gather(2, order)[..., :k]


def _block_topk(model: LFM, x: torch.Tensor, k: int):
    """The eval forward of LFM up to its Top-K (values and positions) on a normalized input."""
    block4 = model.cnn.layer4
    return snet_head(model.cnn.trunk(x), *block4.tensors(), model.covn1_1.weight, k, eps=block4.bn.eps,
                     input_precision=block4.input_precision, return_indices=True, backend=model.backend)


def logits_of(model, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The model's logits of a (B, 3, H, W) input, normalized or uint8 pixels: an LFM in eval scores an input
    above FORWARD_PIXELS in tiles (lfm_topk, the same numbers); anything else goes to the model whole."""
    tileable = isinstance(model, LFM) and type(model).forward is LFM.forward and not model.training
    if tileable and x.shape[2] * x.shape[3] > FORWARD_PIXELS // len(x):
        return model.fc1(lfm_topk(model, x)[0].flatten(1))
    return model(normalize_pixels(x, dtype))


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
                        logits = logits_of(model, chunk.to(ctx.device, non_blocking=True), dtype)
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
    # The loaders carry uint8 pixels, normalized a chunk (or tile) at a time: a quarter of the memory.
    dataset = ImageDataset(items, dataclasses.replace(transform, normalize=False), max_pixels,
                           exif_transpose=exif_transpose)
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
