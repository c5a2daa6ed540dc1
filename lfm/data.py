"""Finding labeled images on disk (CNNDetection layout) and loading them in batches.

Layout: a folder holding `0_real` and/or `1_fake` is a labeled folder (label 0 = real, 1 = generated).
Training reads `ROOT/train` and `ROOT/val`, each either flat (`ROOT/train/0_real`, ...) or split into
classes (`ROOT/train/car/0_real`, ...). Evaluation treats each labeled folder under a root as a test
subset. Unreadable files are not fatal: a sample that fails to load comes back as a failure with its
reason, the batch goes on without it, and the caller reports every failure at the end.
"""
import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import UsageError
from .images import DEFAULT_MAX_PIXELS, UnusableImage, read_rgb

REAL_DIR, FAKE_DIR = "0_real", "1_fake"
LABEL_DIRS = {REAL_DIR: 0, FAKE_DIR: 1}
UNLABELED = -1


@dataclass(frozen=True)
class Item:
    path: Path
    label: int = UNLABELED


def list_files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file under `folder` (recursively), sorted; what is not an image is
    found out when it is read."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def is_labeled(folder: Path) -> bool:
    return any((folder / name).is_dir() for name in LABEL_DIRS)


def labeled_items(folder: Path) -> list[Item]:
    """The files of folder/0_real (label 0) and folder/1_fake (label 1)."""
    return [Item(path, label) for name, label in LABEL_DIRS.items() if (folder / name).is_dir()
            for path in list_files(folder / name)]


def labeled_folders(root: Path) -> list[Path]:
    """Folders under `root` (itself included) that hold 0_real or 1_fake, in sorted order."""
    if is_labeled(root):
        return [root]
    return [found for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            for found in labeled_folders(child)]


def require_folder(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"no such folder: {path}")
    return path


def training_items(root, split: str, classes=None) -> list[Item]:
    """Labeled images of ROOT/<split>, either flat or from the given class subfolders (all by default)."""
    base = Path(root) / split
    if not base.is_dir():
        raise UsageError(f"no {split} folder at {base}: expected ROOT/{split}/[<class>/]{{0_real,1_fake}}")
    if classes:
        folders = [base / name for name in classes]
        for folder in folders:
            if not is_labeled(folder):
                raise UsageError(f"class folder {folder} does not hold {REAL_DIR} or {FAKE_DIR}")
    else:
        folders = labeled_folders(base)
        if not folders:
            raise UsageError(f"no {REAL_DIR} or {FAKE_DIR} folder under {base}")
    items = [item for folder in folders for item in labeled_items(folder)]
    if not items:
        raise UsageError(f"empty dataset: no files in the {REAL_DIR}/{FAKE_DIR} folders under {base}")
    return items


def find_test_subsets(roots, depth: int | None = None) -> dict[str, list[Item]]:
    """Test subsets under the given roots: each labeled folder, or with `depth`, each folder `depth`
    levels below a root with every labeled folder beneath it merged (the authors' protocol for sets
    such as ForenSynths, whose generators hold one labeled folder per object class).

    Subsets are named by their path relative to the root, prefixed by the root's name when there are
    several roots; a root that is itself labeled is named after its folder."""
    roots = [require_folder(root) for root in roots]
    subsets = {}
    for root in roots:
        folders = labeled_folders(root)
        if not folders:
            raise UsageError(f"no folder holding {REAL_DIR} or {FAKE_DIR} under {root}")
        for folder in folders:
            relative = folder.relative_to(root).parts
            if depth is not None:
                relative = relative[:depth]
            name = "/".join(((root.name,) if len(roots) > 1 or not relative else ()) + relative)
            subsets.setdefault(name, []).extend(labeled_items(folder))
    empty = [name for name, items in subsets.items() if not items]
    if empty:
        raise UsageError(f"empty test subset(s): {', '.join(empty)}")
    return subsets


def expand_paths(specs) -> list[Path]:
    """Files, folders (all files beneath, recursively) and glob patterns -> files in the given order."""
    files = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files += list_files(path)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(str(spec)):
            matches = sorted(glob.glob(str(spec), recursive=True))
            if not matches:
                raise UsageError(f"no file matches {spec}")
            files += expand_paths(matches)
        else:
            raise UsageError(f"no such file or folder: {spec}")
    if not files:
        raise UsageError("no files to score")
    return files


@dataclass
class Sample:
    image: torch.Tensor | None
    label: int
    index: int
    error: str | None = None


class ImageDataset(Dataset):
    """Items -> Samples through `transform(rgb_image, rng)`; a file that cannot be used comes back as a
    Sample with `error` set. The rng of a sample is keyed on (seed, epoch, index): set `epoch` before
    each pass, and augmentation is the same whatever the number of workers or ranks."""

    def __init__(self, items, transform, max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0):
        self.items, self.transform, self.max_pixels, self.seed = list(items), transform, max_pixels, seed
        self.epoch = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        try:
            image = self.transform(read_rgb(item.path, self.max_pixels), rng)
        except UnusableImage as err:
            return Sample(None, item.label, index, str(err))
        return Sample(image, item.label, index)


@dataclass
class Batch:
    """A loaded batch: one (images, labels, indices) group per image size (inputs of one size stack
    into one tensor), and (index, reason) for each sample that failed to load."""

    groups: list
    failures: list


def collate_samples(samples) -> Batch:
    by_size = {}
    for s in samples:
        if s.error is None:
            by_size.setdefault(tuple(s.image.shape), []).append(s)
    groups = [(torch.stack([s.image for s in group]), torch.tensor([s.label for s in group]),
               torch.tensor([s.index for s in group])) for group in by_size.values()]
    return Batch(groups, [(s.index, s.error) for s in samples if s.error is not None])


def make_loader(dataset, sampler, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    # A private generator: creating an iterator would otherwise draw from torch's global RNG, and an
    # exact resume needs that stream to be touched only by the model.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_samples, pin_memory=pin_memory, generator=torch.Generator())


def describe_failures(failures, paths, limit: int = 20) -> str:
    """'skipped N file(s) ...' with the first `limit` paths and reasons, for a warning."""
    lines = [f"skipped {len(failures)} file(s) that could not be used:"]
    lines += [f"  {paths[index]}: {reason}" for index, reason in failures[:limit]]
    if len(failures) > limit:
        lines.append(f"  ... and {len(failures) - limit} more")
    return "\n".join(lines)
