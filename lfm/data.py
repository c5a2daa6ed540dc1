"""Finding labeled images on disk and loading them in batches.

Layout: a folder holding `0_real` and/or `1_fake` is a labeled folder (label 0 = real, 1 = generated).
Training reads `ROOT/train` and `ROOT/val`, each either flat (`ROOT/train/0_real`, ...) or split into
classes (`ROOT/train/car/0_real`, ...). Evaluation finds test subsets in one of the benchmarks'
layouts (LAYOUTS): CNNDetection (each labeled folder under a root), GenImage
(`<generator>/val/{ai,nature}`) or a CSV list (`path,label[,subset]`). Unreadable files are not
fatal: a sample that fails to load comes back as a failure with its reason, the batch goes on
without it, and the caller reports every failure at the end.
"""
import csv
import fnmatch
import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import UsageError, warn
from .images import DEFAULT_MAX_PIXELS, UnusableImage, read_rgb

REAL_DIR, FAKE_DIR = "0_real", "1_fake"
LABEL_DIRS = {REAL_DIR: 0, FAKE_DIR: 1}
UNLABELED = -1


@dataclass(frozen=True)
class Item:
    path: Path
    label: int = UNLABELED


def walk(folder: Path, max_depth: int | None = None, descend=lambda folder: True):
    """(path, is_folder) for every non-hidden entry under `folder`, depth first in name order. Symlinks are
    followed, but each real folder is entered once, so symlink loops end and an aliased folder counts once.
    `max_depth` limits how deep it goes (1: the entries of `folder`); `descend(path)` may prune a folder."""
    seen = {os.path.realpath(folder)}

    def visit(directory: Path, depth: int):
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as err:
            raise UsageError(f"cannot list folder {directory}: {err.strerror}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = directory / entry.name
            if entry.is_dir():
                real = os.path.realpath(path)
                if real in seen:
                    continue
                seen.add(real)
                yield path, True
                if (max_depth is None or depth < max_depth) and descend(path):
                    yield from visit(path, depth + 1)
            elif entry.is_file():
                yield path, False

    yield from visit(Path(folder), 1)


def list_files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file under `folder` (recursively), sorted; what is not an image is
    found out when it is read."""
    return sorted(path for path, is_folder in walk(folder) if not is_folder)


def is_labeled(folder: Path, class_dirs=LABEL_DIRS) -> bool:
    return any((folder / name).is_dir() for name in class_dirs)


def labeled_items(folder: Path, class_dirs=LABEL_DIRS) -> list[Item]:
    """The files of folder/0_real (label 0) and folder/1_fake (label 1), or of other class folders."""
    return [Item(path, label) for name, label in class_dirs.items() if (folder / name).is_dir()
            for path in list_files(folder / name)]


def labeled_folders(root: Path) -> list[Path]:
    """Folders under `root` (itself included) that hold 0_real or 1_fake, in sorted order; a labeled
    folder may hold further labeled folders beside its class folders."""
    beneath = walk(root, descend=lambda folder: folder.name not in LABEL_DIRS)
    return [folder for folder in [Path(root)] + [path for path, is_folder in beneath if is_folder]
            if folder.name not in LABEL_DIRS and is_labeled(folder)]


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


def distinct_roots(roots) -> list[Path]:
    """The given roots (folders, or files for a CSV list), each once (by real path); a root inside another
    would count images twice."""
    unique = {}
    for root in map(Path, roots):
        if not root.exists():
            raise UsageError(f"no such folder: {root}")
        unique.setdefault(Path(os.path.realpath(root)), root)
    for real, root in unique.items():
        for other_real, other in unique.items():
            if real != other_real and other_real in real.parents:
                raise UsageError(f"test root {root} lies inside test root {other}; give only one of them")
    return list(unique.values())


def root_names(roots) -> list[str]:
    """Per root, the shortest tail of its real path that no other root shares ("test" for one root,
    "a/test" and "b/test" for two roots named test)."""
    parts = [Path(os.path.realpath(root)).parts for root in roots]
    for n in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return ["/".join(p) for p in parts]


# ---------------------------------------------------------------------------------------------
# Test-set layouts: each finds (subset path relative to the root, items) in one root, or nothing
# ---------------------------------------------------------------------------------------------
GENIMAGE_DIRS = {"nature": 0, "ai": 1}
GENIMAGE_SPLIT = "val"  # GenImage's test images are its val split


def _cnndetection(root: Path) -> list:
    folders = labeled_folders(root) if root.is_dir() else []
    for folder in folders:
        outer = [other for other in folders if other in folder.parents]
        if outer:
            warn("eval", f"{folder} holds {REAL_DIR}/{FAKE_DIR} inside the labeled folder {outer[-1]}; "
                          "it is scored as a subset of its own")
    return [(folder.relative_to(root).parts, labeled_items(folder)) for folder in folders]


def _genimage(root: Path) -> list:
    """<generator>/.../val/{ai,nature}: one subset per val folder, named by the path above it."""
    def is_class_dir(folder):
        return folder.name in GENIMAGE_DIRS and folder.parent.name == GENIMAGE_SPLIT

    if not root.is_dir():
        return []
    beneath = walk(root, descend=lambda folder: not is_class_dir(folder))
    folders = [folder for folder in [Path(root)] + [path for path, is_folder in beneath if is_folder]
               if folder.name == GENIMAGE_SPLIT and is_labeled(folder, GENIMAGE_DIRS)]
    return [(folder.relative_to(root).parts[:-1], labeled_items(folder, GENIMAGE_DIRS)) for folder in folders]


CSV_LABELS = {"0": 0, "1": 1, "real": 0, "fake": 1}


def _csv_list(path: Path) -> list:
    """Rows path,label[,subset] (an optional header row starting with "path"); label 0/1 or real/fake;
    relative paths from the list's folder; subset named after the list's file when not given."""
    if not path.is_file() or path.suffix.lower() != ".csv":
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"cannot read the list {path}: {err}") from None
    subsets = {}
    for number, row in enumerate(rows, 1):
        if not row or (number == 1 and row[0].strip().lower() == "path"):
            continue
        if len(row) not in (2, 3) or row[1].strip().lower() not in CSV_LABELS:
            raise UsageError(f"{path} line {number}: expected path,label[,subset] with label 0, 1, real or fake, "
                             f"got {','.join(row)!r}")
        file = path.parent / row[0]
        if not file.is_file():
            raise UsageError(f"{path} line {number}: no such file: {file}")
        subset = tuple(part for part in (row[2] if len(row) == 3 else path.stem).split("/") if part)
        subsets.setdefault(subset, []).append(Item(file, CSV_LABELS[row[1].strip().lower()]))
    return list(subsets.items())


# name -> (what it looks like, how to find its subsets)
LAYOUTS = {
    "cnndetection": (f"<subset>/[<class>/]{{{REAL_DIR},{FAKE_DIR}}}", _cnndetection),
    "genimage": (f"<generator>/{GENIMAGE_SPLIT}/{{ai,nature}}", _genimage),
    "csv": ("a .csv file of path,label[,subset]", _csv_list),
}


def root_subsets(root: Path, layout: str | None = None) -> list:
    """(subset path, items) pairs of one root in the named layout, or in the one layout it fits."""
    if layout is not None and layout not in LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not root.is_dir() and not (root.is_file() and root.suffix.lower() == ".csv"):
        raise UsageError(f"{root} is not a folder (nor a .csv list)")
    tried = [layout] if layout else list(LAYOUTS)
    found = {name: LAYOUTS[name][1](root) for name in tried}
    fits = [name for name, subsets in found.items() if subsets]
    if not fits:
        raise UsageError(f"{root} fits none of the layouts tried: "
                         + ", ".join(f"{name} ({LAYOUTS[name][0]})" for name in tried))
    if len(fits) > 1:
        raise UsageError(f"{root} fits several layouts ({', '.join(fits)}); name one with --layout")
    return found[fits[0]]


def find_test_subsets(roots, depth: int | None = None, layout: str | None = None) -> dict[str, list[Item]]:
    """Test subsets under the given roots, in the named layout or the one each root fits (LAYOUTS):
    each labeled folder, GenImage generator or CSV subset. With `depth`, subset names are cut to
    their first `depth` components and subsets under the same name merged (the authors' protocol for
    sets such as ForenSynths, whose generators hold one labeled folder per object class).

    Subsets are named by their path relative to the root, prefixed by the root's name (made unique)
    when there are several roots; a root that is itself a subset is named after its folder. A labeled
    folder inside another is a subset of its own, with a warning. Nothing is read but folder listings
    (and a CSV list), so a bad layout is refused before any image is."""
    if depth is not None and depth < 0:
        raise UsageError(f"--subset-depth must be >= 0, got {depth}")
    roots = distinct_roots(roots)
    subsets = {}
    for root, root_name in zip(roots, root_names(roots)):
        for relative, items in root_subsets(root, layout):
            if depth is not None:
                relative = relative[:depth]
            prefix = (root_name,) if len(roots) > 1 else (() if relative else (root.stem,))
            subsets.setdefault("/".join(prefix + relative), []).extend(items)
    empty = [name for name, items in subsets.items() if not items]
    if empty:
        raise UsageError(f"empty test subset(s): {', '.join(empty)}")
    return subsets


def matches(parts: tuple, pattern: tuple) -> bool:
    """Whether path components match glob components, `**` standing for any number of folders."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return matches(parts, pattern[1:]) or (bool(parts) and matches(parts[1:], pattern))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and matches(parts[1:], pattern[1:])


def glob_files(spec: str) -> list[Path]:
    """Files matching a glob pattern (`**`: any number of folders), a matching folder giving every file
    beneath it. Hidden entries are skipped, except in the part before the first wildcard. Walks with
    `walk`, so it ends on symlink loops."""
    parts = Path(spec).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base, pattern = Path(*parts[:fixed]) if fixed else Path("."), parts[fixed:]
    if not base.is_dir():
        return []
    found, expanded = [], None
    for path, is_folder in walk(base, max_depth=None if "**" in pattern else len(pattern)):
        if expanded is not None and expanded in path.parents:
            continue  # already taken with a matching folder above it
        if matches(path.relative_to(base).parts, pattern):
            if is_folder:
                expanded = path
                found += list_files(path)
            else:
                found.append(path)
    return sorted(found)


def expand_paths(specs) -> list[Path]:
    """Files, folders (all files beneath, recursively) and glob patterns -> files in the given order,
    each real file once (the first path naming it)."""
    files, seen = [], set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = list_files(path)
        elif path.is_file():
            found = [path]
        elif path.exists():
            raise UsageError(f"not a regular file or folder: {spec}")
        elif glob.has_magic(str(spec)):
            found = glob_files(str(spec))
            if not found:
                raise UsageError(f"no file matches {spec}")
        else:
            raise UsageError(f"no such file or folder: {spec}")
        for file in found:
            real = os.path.realpath(file)
            if real not in seen:
                seen.add(real)
                files.append(file)
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

    def __init__(self, items, transform, max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0,
                 exif_transpose: bool = False):
        self.items, self.transform, self.max_pixels, self.seed = list(items), transform, max_pixels, seed
        self.exif_transpose = exif_transpose
        self.epoch = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        try:
            image = self.transform(read_rgb(item.path, self.max_pixels, self.exif_transpose), rng)
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
