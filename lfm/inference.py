"""Scoring a list of images with a model: batched, sharded over ranks, gathered on every rank.

Used by validation during training, `lfm eval` and `lfm predict`, so all three preprocess and score
the same way.
"""
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .data import ImageDataset, make_loader
from .images import DEFAULT_MAX_PIXELS
from .runtime import Context, all_gather, autocast, bar_disabled


@dataclass
class Scores:
    """prob_fake per item (NaN where the item could not be scored) and (index, reason) per failure."""

    prob_fake: np.ndarray
    failures: list


def score_items(model, items, transform, ctx: Context, *, batch_size: int = 64, workers: int = 0,
                precision: str = "float32", max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool | None = False,
                desc: str = "scoring") -> Scores:
    """Probability of being generated, sigmoid(logit) in float32 as the authors compute it, for each
    item. Rank r scores items r, r + world_size, ...; the results are gathered on every rank."""
    dataset = ImageDataset(items, transform, max_pixels)
    loader = make_loader(dataset, range(ctx.rank, len(dataset), ctx.world_size), batch_size, workers,
                         pin_memory=ctx.device.type == "cuda")
    indices, probs, failures = [], [], []
    model.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=bar_disabled(progress, ctx), leave=False):
            failures += batch.failures
            for images, _, batch_indices in batch.groups:
                try:
                    with autocast(ctx.device, precision):
                        logits = model(images.to(ctx.device, non_blocking=True))
                except ValueError as err:  # the model's input checks, e.g. an image below its minimum size
                    failures += [(int(i), str(err)) for i in batch_indices]
                    continue
                probs.append(torch.sigmoid(logits.float()).squeeze(1).cpu())
                indices.append(batch_indices)
    local = (torch.cat(indices) if indices else torch.empty(0, dtype=torch.long),
             torch.cat(probs) if probs else torch.empty(0), failures)
    prob_fake = np.full(len(items), np.nan)
    all_failures = []
    for rank_indices, rank_probs, rank_failures in all_gather(local, ctx):
        prob_fake[rank_indices.numpy()] = rank_probs.double().numpy()
        all_failures += rank_failures
    return Scores(prob_fake, sorted(all_failures))
