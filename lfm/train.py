"""Training a detector with the authors' recipe, resumable bit for bit, on one process or under torchrun.

Recipe as released (the defaults): Adam (lr 1e-4, betas 0.9/0.999), BCE with logits, batch 32,
resize to 256 -> random crop 224 -> horizontal flip, learning rate x0.9 every 10 epochs, LFM with the
released dropout (plain p = 0.1) and no random-K loss. Each epoch ends with validation on ROOT/val or
on another root in any of eval's layouts (`val_data`); its accuracy, or AP with `select_by="ap"`, drives
early stopping and the best checkpoint. Each epoch writes to the run folder:

  options.json       the options of the run (a resumed run reads them back)
  log.csv            one row per epoch: loss, validation metrics, learning rate, time
  last.safetensors   weights after the last epoch; best.safetensors: after the best one
  resume.pt          model, optimizer, scheduler, early-stopping and per-rank RNG states

`--batch-size` is the global batch: under torchrun each of N ranks takes batch/N of every step, so
the data seen per step does not depend on N (BatchNorm statistics are per rank, as usual with DDP).
"""
import csv
import dataclasses
import fcntl
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from .data import ImageDataset, describe_failures, find_test_subsets, make_loader, training_items
from .errors import UsageError, warn
from .images import DEFAULT_MAX_PIXELS, TEST_SIZE, EvalTransform, TrainTransform
from .inference import DEFAULT_WORKERS, cap_workers, check_loading_options, score_items
from .metrics import binary_metrics
from .model import DROPOUT_MODES
from .runtime import (
    PRECISIONS,
    Context,
    all_gather,
    any_rank,
    autocast,
    bar_disabled,
    broadcast_buffers,
    check_device,
    compute_dtype,
    raise_if_interrupted,
    session,
)
from .weights import (
    DEFAULT_K,
    MODEL_NAMES,
    atomic_write,
    build_model,
    prepare_output_folder,
    read_torch_file,
    save_weights,
    write_json,
)

OPTIONS_FILE, LOG_FILE, RESUME_FILE = "options.json", "log.csv", "resume.pt"
LAST_WEIGHTS, BEST_WEIGHTS = "last.safetensors", "best.safetensors"
LOCK_FILE = ".lock"  # holds the pid of the training process while the folder is in use
RUN_FILES = (OPTIONS_FILE, LOG_FILE, RESUME_FILE, LAST_WEIGHTS, BEST_WEIGHTS)
LOG_COLUMNS = ("epoch", "lr", "train_loss", "val_acc", "val_ap", "val_real_acc", "val_fake_acc", "seconds")
# Options that may differ when a run is resumed: they do not change what is computed.
RESUME_OVERRIDES = ("epochs", "workers", "progress", "device")
# Seeds reach numpy (non-negative only) and torch.manual_seed(seed + rank) and the sampler's seed + epoch
# (below 2**64): this range leaves room for both.
SEED_LIMIT = 2 ** 63


def check_seed(seed):
    """Refuse a seed that numpy or torch would reject later, at the first image."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"--seed must be an integer in [0, 2**63 - 1], got {seed!r}")


SELECTION_METRICS = ("acc", "ap")


def _option(default=dataclasses.MISSING, *, help: str, **argparse_settings):
    """A TrainOptions field that `lfm train` takes as --name: its default, its help text ("{default}" is
    filled in) and argparse settings beyond the type, which the command line reads from the annotation."""
    return dataclasses.field(default=default, metadata=dict(help=help, **argparse_settings))


@dataclass
class TrainOptions:
    """Everything a run depends on: the one source of the training defaults (the released recipe), of the
    augmentation settings (TrainTransform.from_options) and of `lfm train`'s options and their help (built
    from these fields). Fields without help are the runtime options eval and predict share."""

    data: str = _option(help="dataset root holding train/ and val/", metavar="ROOT")
    out: str = _option("runs/train", metavar="RUN", help="run folder for the log and checkpoints ({default}); locked "
                                                         "while training, and it must be empty or a run of ours")
    classes: list | None = _option(None, help="comma-separated class folders (default: all)")
    val_data: str | None = _option(None, metavar="ROOT", help="validation root in any layout lfm eval reads, its "
                                                              "images pooled (default: ROOT/val of --data)")
    select_by: str = _option("acc", choices=SELECTION_METRICS,
                             help="validation metric that picks the best epoch and drives early stopping: "
                                  "acc (at 0.5) or ap ({default})")
    model: str = _option("lfm", choices=MODEL_NAMES, help="lfm, lfm-gap (ablation) or npr (baseline) ({default})")
    k: int = _option(DEFAULT_K, help="LFM's Top-K ({default})")
    dropout: str = _option("released", choices=DROPOUT_MODES,
                           help="LFM's rank-based dropout: paper, released (plain p=pmin) or off ({default})")
    pmin: float = _option(0.1, help="smallest drop probability ({default})")
    pmax: float = _option(0.3, help="largest drop probability, paper mode ({default})")
    random_k_weight: float = _option(0.0,
                                     help="weight of LFM's random-K auxiliary loss ({default}; 0 = off, paper 0.02)")
    epochs: int = _option(50, help="maximum epochs ({default})")
    batch_size: int = _option(32, help="global batch, split over torchrun ranks ({default})")
    lr: float = _option(1e-4, help="Adam learning rate ({default})")
    betas: tuple = _option((0.9, 0.999), help="Adam betas ({default})")
    lr_step: int = _option(10, help="multiply the learning rate by --lr-gamma every this many epochs ({default})")
    lr_gamma: float = _option(0.9, help="learning rate factor every --lr-step epochs ({default})")
    patience: int = _option(5, help="early stopping after this many epochs without gain ({default}; 0 = off)")
    min_delta: float = _option(1e-3, help="smallest gain of the --select-by metric that counts ({default})")
    resize: int | None = _option(TEST_SIZE, help="resize to a square first ({default}; 0 = keep size)")
    crop: int | None = _option(224, help="random crop size ({default}; 0 = no crop)")
    flip: bool = _option(True, help="no random horizontal flip")  # on by default: the command line has --no-flip
    blur_prob: float = _option(0.0, help="probability of a Gaussian blur ({default}; also set by --aug)")
    blur_sigma: tuple = _option((0.0, 3.0), help="blur sigma range ({default})")
    jpeg_prob: float = _option(0.0, help="probability of JPEG re-compression ({default}; also set by --aug)")
    jpeg_quality: tuple = _option((30, 100), help="JPEG quality range ({default})")
    backend: str = "auto"
    precision: str = "float32"
    device: str = "auto"
    workers: int = DEFAULT_WORKERS
    seed: int = _option(0, help="seed of the initial weights, shuffling and augmentation ({default})")
    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_transpose: bool = False
    progress: bool | None = None  # None: a progress bar when stderr is a terminal

    def check(self):
        """Refuse options that cannot work, naming the option and its value, before any work."""
        def need(condition, message):
            if not condition:
                raise UsageError(message)

        def number(name, fits, expected, integer=False):
            value = getattr(self, name)
            kind = int if integer else (int, float)
            need(isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and fits(value),
                 f"--{name.replace('_', '-')} must be {expected}, got {value!r}")

        need(self.model in MODEL_NAMES, f"--model must be one of {', '.join(MODEL_NAMES)}")
        need(self.dropout in DROPOUT_MODES, f"--dropout must be one of {', '.join(DROPOUT_MODES)}")
        need(self.random_k_weight == 0 or self.model == "lfm", "--random-k-weight applies to --model lfm only")
        need(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
        need(self.select_by in SELECTION_METRICS, f"--select-by must be one of {', '.join(SELECTION_METRICS)}")
        for name in ("k", "epochs", "lr_step"):
            number(name, lambda value: value >= 1, "an integer >= 1", integer=True)
        number("patience", lambda value: value >= 0, "an integer >= 0", integer=True)
        for name in ("resize", "crop"):
            if getattr(self, name) is not None:
                number(name, lambda value: value >= 0, "an integer >= 0", integer=True)
        for name in ("random_k_weight", "min_delta", "lr"):
            number(name, lambda value: value >= 0, "a finite number >= 0")
        number("lr_gamma", lambda value: value > 0, "a finite number > 0")
        number("pmin", lambda value: 0 <= value < 1, "in [0, 1)")
        number("pmax", lambda value: self.pmin <= value < 1, "in [pmin, 1)")
        need(all(0 <= beta < 1 for beta in self.betas), f"--betas must lie in [0, 1), got {self.betas}")
        check_loading_options(self.batch_size, self.workers, self.max_pixels)
        check_seed(self.seed)
        check_device(self.device)
        need(not (self.resize and self.crop and self.crop > self.resize), "--crop must not exceed --resize")
        need(0 <= self.blur_prob <= 1 and 0 <= self.jpeg_prob <= 1, "augmentation probabilities must lie in [0, 1]")
        need(1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100, "--jpeg-quality needs 1 <= low <= high <= 100")
        need(0 <= self.blur_sigma[0] <= self.blur_sigma[1] < math.inf, "--blur-sigma needs 0 <= low <= high")

    def model_config(self) -> dict:
        config = {"model": self.model}
        if self.model == "lfm":
            config.update(k=self.k, dropout=self.dropout, pmin=self.pmin, pmax=self.pmax,
                          random_k_weight=self.random_k_weight)
        return config

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "TrainOptions":
        """The options of an options.json; a value of the wrong type (a hand edit) raises ValueError naming it."""
        if not isinstance(values, dict):
            raise ValueError(f"expected an object of options, got {json.dumps(values)[:80]}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key in types and not _JSON_TYPES[types[key]][0](value):
                raise ValueError(f"{json.dumps(key)} must be {_JSON_TYPES[types[key]][1]}, got {json.dumps(value)}")
        return cls(**{key: tuple(value) if types.get(key) is tuple else value for key, value in values.items()})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What options.json may hold for a field of each annotated type, and how to say it.
_JSON_TYPES = {
    int: (_is_int, "an integer"),
    int | None: (lambda value: value is None or _is_int(value), "an integer or null"),
    float: (_is_number, "a number"),
    str: (lambda value: isinstance(value, str), "a string"),
    str | None: (lambda value: value is None or isinstance(value, str), "a string or null"),
    bool: (lambda value: isinstance(value, bool), "true or false"),
    bool | None: (lambda value: value is None or isinstance(value, bool), "true, false or null"),
    tuple: (lambda value: isinstance(value, list) and len(value) == 2 and all(map(_is_number, value)),
            "a pair of numbers"),
    list | None: (lambda value: value is None or isinstance(value, list) and all(isinstance(v, str) for v in value),
                  "a list of names or null"),
}


def train(opts: TrainOptions, resume: bool = False, force: bool = False, log=print) -> dict | None:
    """Train (or, with resume, continue the run in opts.out); returns a summary of the run on rank 0
    (None on the other ranks). The run folder is locked while training; a new run refuses a folder that
    holds anything but a run of ours that never finished an epoch, unless `force`."""
    opts.check()
    run_dir = prepare_output_folder(opts.out, "--out")
    with session(opts.device, opts.backend, opts.precision) as ctx, locked_run_folder(run_dir, ctx):
        if resume:
            check_resumable(run_dir)
        elif not force:
            check_new_run_folder(run_dir)
        summary = Trainer(opts, ctx, log).run(resume)
    return summary if ctx.is_main else None


def read_options(run_dir) -> TrainOptions:
    path = Path(run_dir) / OPTIONS_FILE
    if not path.is_file():
        raise UsageError(f"nothing to resume in {run_dir}: no {OPTIONS_FILE}")
    try:
        return TrainOptions.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise UsageError(f"cannot read {path}: not the options of a run of ours ({err})") from None


def read_log(run_dir: Path) -> list[list[str]]:
    """The rows of a run's log.csv, header first, or a UsageError saying what is wrong with it."""
    path = run_dir / LOG_FILE
    if not path.is_file():
        raise UsageError(f"cannot resume {run_dir}: no {LOG_FILE}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise UsageError(f"cannot resume {run_dir}: {path}: it is empty")
    if tuple(rows[0]) != LOG_COLUMNS:
        raise UsageError(f"cannot resume {run_dir}: {path}: its header is not {','.join(LOG_COLUMNS)}")
    for number, row in enumerate(rows[1:], start=2):
        if not row or not row[0].isdigit():
            raise UsageError(f"cannot resume {run_dir}: {path}: row {number} does not start with an epoch number")
    return rows


def check_resumable(run_dir: Path):
    """A run to resume holds its resume state and a readable log (its options were read already)."""
    if not (run_dir / RESUME_FILE).is_file():
        raise UsageError(f"nothing to resume in {run_dir}: no {RESUME_FILE}")
    read_log(run_dir)


def check_new_run_folder(run_dir: Path):
    """A new run goes into an empty folder, or one holding a run of ours that never finished an epoch."""
    if (run_dir / RESUME_FILE).exists():
        raise UsageError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, choose another --out, "
                         "or pass --force to start over")
    names = sorted(entry.name for entry in run_dir.iterdir() if entry.name != LOCK_FILE)
    ours = OPTIONS_FILE in names and set(names) <= set(RUN_FILES)
    if names and not ours:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UsageError(f"{run_dir} is not empty ({shown}) and holds no run of ours; choose another --out or pass "
                         "--force to write into it")


def _take_lock(run_dir: Path) -> int:
    """An open descriptor holding an exclusive flock on run_dir/.lock, which records our pid. The kernel
    drops the lock when its process dies, so a lock file left by a killed run is stale and taken over."""
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"{run_dir} is in use by another lfm train (process {holder}; lock {path})") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file meanwhile: lock the new one
    stale = os.read(fd, 32).decode(errors="replace").strip()
    if stale:
        warn("train", f"{path}: process {stale} ended without releasing the lock; taking it over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextmanager
def locked_run_folder(run_dir: Path, ctx: Context):
    """Hold an exclusive lock on the run folder (taken by rank 0; every rank fails if it cannot)."""
    fd, problem = None, None
    if ctx.is_main:
        try:
            fd = _take_lock(run_dir)
        except UsageError as err:
            problem = err
    if any_rank(problem is not None, ctx):
        raise problem or UsageError(f"{run_dir} is in use by another lfm train")
    try:
        yield
    finally:
        if fd is not None:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            os.close(fd)


class Trainer:
    """One training run on this process's share of the data: built from the options, then `run`."""

    def __init__(self, opts: TrainOptions, ctx: Context, log):
        self.opts, self.ctx, self.log = opts, ctx, log if ctx.is_main else (lambda *a, **k: None)
        self.run_dir = Path(opts.out)
        if opts.batch_size % ctx.world_size:
            raise UsageError(f"--batch-size {opts.batch_size} is not divisible by the {ctx.world_size} processes")
        train_items = training_items(opts.data, "train", opts.classes)
        self.val_items = (training_items(opts.data, "val", opts.classes) if opts.val_data is None else
                          [item for subset in find_test_subsets([opts.val_data]).values() for item in subset])
        for split, items in (("train", train_items), ("val", self.val_items)):
            labels = {item.label for item in items}
            if len(labels) == 1 and split == "val" and opts.select_by == "ap":
                raise UsageError(f"--select-by ap needs real and fake validation images; the validation set holds "
                                 f"only {'fake' if labels == {1} else 'real'} ones")
            if len(labels) == 1 and ctx.is_main:
                warn("train", f"the {split} set holds only {'fake' if labels == {1} else 'real'} images "
                              f"({len(items)}); its accuracy and AP say little")
        self.train_paths = [item.path for item in train_items]
        augment = TrainTransform.from_options(opts)
        self.val_transform = EvalTransform(opts.resize, opts.crop)
        self.train_set = ImageDataset(train_items, augment, opts.max_pixels, seed=opts.seed,
                                     exif_transpose=opts.exif_transpose)
        self.sampler = DistributedSampler(self.train_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                          shuffle=True, seed=opts.seed)
        local_batch = opts.batch_size // ctx.world_size
        self.workers = cap_workers(opts.workers, len(train_items), local_batch, "train") if ctx.is_main else 0
        self.workers = all_gather(self.workers, ctx)[0]  # rank 0 warns; every rank takes its count
        self.loader = make_loader(self.train_set, self.sampler, local_batch, self.workers,
                                  pin_memory=ctx.device.type == "cuda")

        torch.manual_seed(opts.seed)  # the same initial weights on every rank
        self.dtype = compute_dtype(opts.precision)
        self.model = build_model(opts.model_config(), backend=opts.backend, dtype=self.dtype).to(ctx.device)
        size = opts.crop or opts.resize
        if size and size < getattr(self.model, "min_size", 1):
            raise UsageError(f"training inputs of {size}x{size} are below the model's minimum {self.model.min_size}")
        self.net = self.model
        if ctx.distributed:
            device_ids = [ctx.device] if ctx.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=device_ids)
        torch.manual_seed(opts.seed + ctx.rank)  # dropout and random-K draws differ between ranks
        # Fused Adam: one kernel for all parameters (on CPU 20x or more faster than the default per-tensor loop).
        self.optimizer = torch.optim.Adam((p for p in self.model.parameters() if p.requires_grad),
                                          lr=opts.lr, betas=tuple(opts.betas), fused=ctx.device.type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=opts.lr_step, gamma=opts.lr_gamma)
        self.epoch, self.best_score, self.best_epoch, self.stale_epochs, self.stopped = 0, -math.inf, 0, 0, False
        self.reported_failures = set()

    # ---------------------------------------------------------------------------------------------
    def run(self, resume: bool) -> dict:
        if resume:
            self.load_checkpoint()
        else:
            self.start_run_dir()
        if self.stopped:
            self.log(f"{self.run_dir}: the run stopped early at epoch {self.epoch}; nothing to do")
        while self.epoch < self.opts.epochs and not self.stopped:
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self.train_epoch()
            self.scheduler.step()
            val = self.validate()
            self.epoch += 1
            score = val[self.opts.select_by]
            improved = score > self.best_score + self.opts.min_delta
            if improved:
                self.best_score, self.best_epoch, self.stale_epochs = score, self.epoch, 0
            else:
                self.stale_epochs += 1
            self.stopped = 0 < self.opts.patience <= self.stale_epochs
            seconds = time.perf_counter() - started
            self.save_checkpoint(improved, [self.epoch, lr, loss, val["acc"], val["ap"], val["real_acc"],
                                            val["fake_acc"], round(seconds, 3)])
            self.log(f"epoch {self.epoch}/{self.opts.epochs}  loss {loss:.4f}  val acc {100 * val['acc']:.2f}  "
                     f"ap {100 * val['ap']:.2f}  lr {lr:.3g}  {seconds:.1f}s")
            if self.stopped:
                self.log(f"early stop: no gain in validation {self.opts.select_by} for {self.stale_epochs} epochs")
        return {"run_dir": str(self.run_dir), "epochs": self.epoch, "best_epoch": self.best_epoch,
                "select_by": self.opts.select_by, "best_score": self.best_score, "stopped_early": self.stopped}

    def train_epoch(self) -> float:
        """One pass over the training set; returns the mean loss over all ranks."""
        self.train_set.epoch = self.epoch
        self.sampler.set_epoch(self.epoch)
        self.net.train()
        total, count, failures = 0.0, 0, []
        bar = tqdm(total=len(self.sampler), desc=f"epoch {self.epoch + 1}/{self.opts.epochs}", unit="img",
                   leave=False, disable=bar_disabled(self.opts.progress, self.ctx))
        for batch in self.loader:
            raise_if_interrupted()
            bar.update(sum(len(labels) for _, labels, _ in batch.groups) + len(batch.failures))
            failures += batch.failures
            if len(batch.groups) > 1:
                raise UsageError("training images differ in size after preprocessing; set --resize or --crop")
            if any_rank(not batch.groups, self.ctx):  # a rank with nothing left: every rank skips the step
                continue
            images, labels, _ = batch.groups[0]
            loss = self.step(images.to(self.ctx.device, self.dtype, non_blocking=True),
                             labels.to(self.ctx.device, self.dtype).unsqueeze(1))
            total, count = total + loss * len(labels), count + len(labels)
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.close()
        totals = all_gather((total, count, failures), self.ctx)
        self.report_failures([f for _, _, rank_failures in totals for f in rank_failures], self.train_paths)
        count = sum(c for _, c, _ in totals)
        if count == 0:
            raise UsageError("no training image could be read")
        return sum(t for t, _, _ in totals) / count

    def step(self, images, target) -> float:
        with autocast(self.ctx.device, self.opts.precision):
            if self.opts.random_k_weight > 0:
                logits, aux_logits = self.net(images, return_aux=True)
            else:
                logits, aux_logits = self.net(images), None
        loss = F.binary_cross_entropy_with_logits(logits.to(self.dtype), target)
        if aux_logits is not None:
            loss = loss + self.opts.random_k_weight * F.binary_cross_entropy_with_logits(aux_logits.to(self.dtype),
                                                                                         target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def validate(self) -> dict:
        broadcast_buffers(self.model, self.ctx)
        scores = score_items(self.model, self.val_items, self.val_transform, self.ctx,
                             batch_size=self.opts.batch_size, workers=self.workers,
                             precision=self.opts.precision, max_pixels=self.opts.max_pixels,
                             exif_transpose=self.opts.exif_transpose, progress=self.opts.progress, desc="validation")
        self.report_failures(scores.failures, [item.path for item in self.val_items], split="val")
        scored = ~np.isnan(scores.prob_fake)
        if not scored.any():
            raise UsageError("no validation image could be read")
        labels = [item.label for item, ok in zip(self.val_items, scored) if ok]
        return binary_metrics(labels, scores.prob_fake[scored])

    def report_failures(self, failures, paths, split: str = "train"):
        new = [(i, reason) for i, reason in failures if (split, i) not in self.reported_failures]
        self.reported_failures.update((split, i) for i, _ in new)
        if new and self.ctx.is_main:
            warn("train", f"{split}: " + describe_failures(new, paths))

    # ---------------------------------------------------------------------------------------------
    def start_run_dir(self):
        if self.ctx.is_main:
            write_json(self.run_dir / OPTIONS_FILE, self.opts.to_json())
            with open(self.run_dir / LOG_FILE, "w", newline="") as f:
                csv.writer(f).writerow(LOG_COLUMNS)

    def save_checkpoint(self, improved: bool, log_row: list):
        """Log row, weights, then the resume state last: a run killed in between resumes from the
        previous epoch and drops the extra log row."""
        rng = all_gather((torch.get_rng_state(), torch.cuda.get_rng_state(self.ctx.device)
                          if self.ctx.device.type == "cuda" else None), self.ctx)
        if not self.ctx.is_main:
            return
        with open(self.run_dir / LOG_FILE, "a", newline="") as f:
            csv.writer(f).writerow(log_row)
        config = self.opts.model_config()
        save_weights(self.model, self.run_dir / LAST_WEIGHTS, config, epoch=self.epoch)
        if improved:
            save_weights(self.model, self.run_dir / BEST_WEIGHTS, config, epoch=self.epoch)
        state = {
            "epoch": self.epoch, "best_score": self.best_score, "best_epoch": self.best_epoch,
            "stale_epochs": self.stale_epochs, "stopped": self.stopped, "world_size": self.ctx.world_size,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng,
        }
        atomic_write(self.run_dir / RESUME_FILE, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self):
        path = self.run_dir / RESUME_FILE
        state = read_torch_file(path, "the resume state")
        try:
            if state["world_size"] != self.ctx.world_size:
                raise UsageError(f"{self.run_dir} was trained on {state['world_size']} process(es); resume it on as "
                                 f"many (now {self.ctx.world_size}) to continue exactly")
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            cpu_rng, cuda_rng = state["rng"][self.ctx.rank]
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
            detail = " ".join(str(err).split())[:200]
            raise UsageError(f"{path} is not a resume state of this run ({type(err).__name__}: {detail})") from None
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, self.ctx.device)
        # "best_acc": the name in runs from before best-epoch selection could be by AP
        best = state["best_score"] if "best_score" in state else state["best_acc"]
        self.epoch, self.best_score, self.best_epoch = state["epoch"], best, state["best_epoch"]
        self.stale_epochs, self.stopped = state["stale_epochs"], state["stopped"]
        if self.ctx.is_main:  # drop log rows of an epoch that ended after the last resume state was saved
            rows = read_log(self.run_dir)
            with open(self.run_dir / LOG_FILE, "w", newline="") as f:
                csv.writer(f).writerows([rows[0]] + [row for row in rows[1:] if int(row[0]) <= self.epoch])
        self.log(f"resuming {self.run_dir} after epoch {self.epoch}")
