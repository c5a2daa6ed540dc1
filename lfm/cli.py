"""Command line: `lfm train | eval | predict | demo` (also `python -m lfm`, and `torchrun ... -m lfm`).

Problems with the input (paths, data layout, options) end with `lfm <command>: error: ...` and exit
code 2; anything unexpected with exit code 1 and no traceback unless LFM_DEBUG=1.
"""
import argparse
import dataclasses
import os
import re
import sys

from lfm_kernels import BACKENDS

from .errors import CommandFailed, UsageError
from .evaluate import DEFAULT_OUT as EVAL_OUT
from .images import DEFAULT_MAX_PIXELS, TEST_SIZE
from .inference import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS
from .model import DROPOUT_MODES
from .runtime import PRECISIONS, interrupt_guard
from .train import TrainOptions
from .weights import MODEL_NAMES

# Train options are not given argparse defaults (a resumed run must tell overrides from its saved
# options), so their help shows the defaults of TrainOptions.
TRAIN_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainOptions)}


def _default(name) -> str:
    value = TRAIN_DEFAULTS[name]
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


class _Parser(argparse.ArgumentParser):
    """Bad options end with one line, `lfm <command>: error: ...`, and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _pair(cast):
    def parse(text):
        try:
            low, high = (cast(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected two comma-separated numbers LOW,HIGH, got {text!r}") from None
        return low, high

    return parse


def _names(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names")
    return names


def _size(text):
    """A square side in pixels; 0 turns the step off."""
    value = _at_least(0)(text)
    return value or None


def _at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _add_runtime_options(p):
    """Options every command that runs a model shares."""
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available; under torchrun each "
                                    "rank takes cuda:LOCAL_RANK)")
    p.add_argument("--backend", choices=BACKENDS, help="fused ops: triton on CUDA, torch otherwise (auto)")
    p.add_argument("--precision", choices=PRECISIONS, help="float32, or bf16 autocast")
    p.add_argument("--workers", type=int, help=f"data loading processes (default {DEFAULT_WORKERS})")
    p.add_argument("--max-pixels", type=int,
                   help=f"skip larger images as possible decompression bombs (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--exif-transpose", action="store_true",
                   help="turn images upright by their EXIF orientation first (the authors' pipeline ignores it)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="progress bar (default: when stderr is a terminal)")


def _add_scoring_options(p):
    """Options of eval and predict, which load weights and score images."""
    p.add_argument("--weights", required=True, help="the authors' .pth or our .safetensors")
    p.add_argument("--model", choices=MODEL_NAMES,
                   help="architecture of a .pth file (default lfm); our .safetensors record their own")
    p.add_argument("--no-resize", dest="resize", action="store_const", const=None, default=TEST_SIZE,
                   help=f"score images at their own size instead of resizing to {TEST_SIZE}x{TEST_SIZE}")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images loaded per batch (default {DEFAULT_BATCH_SIZE})")
    _add_runtime_options(p)
    p.set_defaults(device="auto", backend="auto", precision="float32", workers=DEFAULT_WORKERS,
                   max_pixels=DEFAULT_MAX_PIXELS, exif_transpose=False)


def _runtime_kwargs(args) -> dict:
    return dict(model_name=args.model, resize=args.resize, batch_size=args.batch_size, workers=args.workers,
                device=args.device, precision=args.precision, backend=args.backend, max_pixels=args.max_pixels,
                exif_transpose=args.exif_transpose, progress=args.progress)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lfm", description="Detect AI-generated images with LFM (BMVC 2025).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Train options default to "not given" so a resumed run can tell overrides from its saved options.
    p = commands.add_parser("train", argument_default=argparse.SUPPRESS,
                            help="train a detector (the authors' recipe by default)",
                            description="Train on a CNNDetection layout: ROOT/train and ROOT/val, each "
                                        "[<class>/]{0_real,1_fake}. Defaults are the authors' released recipe.")
    p.add_argument("--data", metavar="ROOT", help="dataset root holding train/ and val/")
    p.add_argument("--out", metavar="RUN", help=f"run folder for the log and checkpoints ({_default('out')}); "
                                                 "locked while training, and it must be empty or a run of ours")
    p.add_argument("--force", action="store_true",
                   help="start a new run in --out even if it holds other files or a run")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN exactly where it stopped")
    p.add_argument("--classes", type=_names, help="comma-separated class folders (default: all)")
    p.add_argument("--model", choices=MODEL_NAMES, help="lfm (default), lfm-gap (ablation) or npr (baseline)")
    p.add_argument("--k", type=int, help=f"LFM's Top-K ({_default('k')})")
    p.add_argument("--dropout", choices=DROPOUT_MODES, help="LFM's rank-based dropout (released: plain p=pmin)")
    p.add_argument("--pmin", type=float, help=f"smallest drop probability ({_default('pmin')})")
    p.add_argument("--pmax", type=float, help=f"largest drop probability, paper mode ({_default('pmax')})")
    p.add_argument("--random-k-weight", type=float, help="weight of LFM's random-K auxiliary loss (0 = off; paper 0.02)")
    p.add_argument("--epochs", type=int, help=f"maximum epochs ({_default('epochs')})")
    p.add_argument("--batch-size", type=int, help=f"global batch, split over torchrun ranks ({_default('batch_size')})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate ({_default('lr')})")
    p.add_argument("--betas", type=_pair(float), help=f"Adam betas ({_default('betas')})")
    p.add_argument("--lr-step", type=int,
                   help=f"multiply the learning rate by --lr-gamma every this many epochs ({_default('lr_step')})")
    p.add_argument("--lr-gamma", type=float,
                   help=f"learning rate factor every --lr-step epochs ({_default('lr_gamma')})")
    p.add_argument("--patience", type=int,
                   help=f"early stopping after this many epochs without gain ({_default('patience')}; 0 = off)")
    p.add_argument("--min-delta", type=float,
                   help=f"smallest validation accuracy gain that counts ({_default('min_delta')})")
    p.add_argument("--resize", type=_size, help=f"resize to a square first ({_default('resize')}; 0 = keep size)")
    p.add_argument("--crop", type=_size, help=f"random crop size ({_default('crop')}; 0 = no crop)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    p.add_argument("--blur-prob", type=float, help=f"probability of a Gaussian blur ({_default('blur_prob')})")
    p.add_argument("--blur-sigma", type=_pair(float), help=f"blur sigma range ({_default('blur_sigma')})")
    p.add_argument("--jpeg-prob", type=float, help=f"probability of JPEG re-compression ({_default('jpeg_prob')})")
    p.add_argument("--jpeg-quality", type=_pair(int), help=f"JPEG quality range ({_default('jpeg_quality')})")
    p.add_argument("--seed", type=int,
                   help=f"seed of the initial weights, shuffling and augmentation ({_default('seed')})")
    _add_runtime_options(p)
    p.set_defaults(func=run_train)

    p = commands.add_parser("eval", help="accuracy and AP per test subset",
                            description="Every folder holding 0_real/1_fake under the roots is a test subset.")
    p.add_argument("--data", metavar="ROOT", nargs="+", required=True, help="test roots")
    p.add_argument("--subset-depth", type=int, metavar="N",
                   help="subsets are the folders N levels below a root, merging the labeled folders beneath "
                        "(e.g. 1 for ForenSynths, whose generators hold one folder per class)")
    p.add_argument("--out", default=EVAL_OUT,
                   help=f"folder for results.csv, results.json and predictions.csv (default {EVAL_OUT})")
    _add_scoring_options(p)
    p.set_defaults(func=run_eval)

    p = commands.add_parser("predict", help="probability that each image is generated",
                            description="Score files, folders (recursively) and glob patterns.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, folders (every file beneath) and glob patterns (quote them; ** = any folders)")
    p.add_argument("--json", action="store_true", help="one JSON object per line (path, prob_fake[, heatmap])")
    p.add_argument("--heatmap", metavar="DIR",
                   help="write a PNG per image showing LFM's Top-K positions (its path is the third column)")
    _add_scoring_options(p)
    p.set_defaults(func=run_predict)

    p = commands.add_parser("demo", help="build a small real/fake set offline, train LFM, its GAP ablation "
                                         "and NPR, and test them on held-out generators")
    p.add_argument("--out", default="demo_out", help="output folder (demo_out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data set and the training runs (0)")
    p.add_argument("--epochs", type=_at_least(1), default=None, help="training epochs per model (the demo's own)")
    p.add_argument("--crops", type=_at_least(1), default=None, help="crops per source photo (the demo's own)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    p.set_defaults(func=run_demo)
    return parser


def run_train(args) -> int:
    from .train import RESUME_OVERRIDES, TrainOptions, read_options, train

    given = {key: value for key, value in vars(args).items() if key not in ("command", "func", "resume", "force")}
    if "resume" in args:
        opts = read_options(args.resume)
        if "out" in given:
            raise UsageError("--out does not go with --resume: the run folder is the one given to --resume")
        changed = sorted(key for key, value in given.items()
                         if key not in RESUME_OVERRIDES and getattr(opts, key) != value)
        if changed:
            raise UsageError(f"cannot change {', '.join('--' + k.replace('_', '-') for k in changed)} when resuming; "
                             f"only {', '.join('--' + k for k in RESUME_OVERRIDES)} may change")
        for key in RESUME_OVERRIDES:
            if key in given:
                setattr(opts, key, given[key])
        opts.out = args.resume
    else:
        if "data" not in given:
            raise UsageError("--data is required (or --resume RUN)")
        opts = TrainOptions(**given)
    summary = train(opts, resume="resume" in args, force="force" in args)
    if summary and summary["best_epoch"]:
        print(f"best validation accuracy {100 * summary['best_acc']:.2f} at epoch {summary['best_epoch']}; "
              f"weights in {summary['run_dir']}")
    return 0


def run_eval(args) -> int:
    from .evaluate import evaluate

    evaluate(args.weights, args.data, depth=args.subset_depth, out=args.out, **_runtime_kwargs(args))
    return 0


def run_predict(args) -> int:
    from .predict import predict

    predict(args.weights, args.paths, as_json=args.json, heatmap_dir=args.heatmap, **_runtime_kwargs(args))
    return 0


def run_demo(args) -> int:
    from .demo import run_demo as demo

    demo(out=args.out, seed=args.seed, epochs=args.epochs, crops_per_photo=args.crops, progress=args.progress)
    return 0


def one_line(text: str) -> str:
    """A message as one line: terminal escapes dropped, lines joined."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a bad option (one line already printed)
        return done.code
    try:
        with interrupt_guard():
            return args.func(args)
    except UsageError as err:
        print(f"lfm {args.command}: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (continue a training run with --resume RUN)" if args.command == "train" else ""
        print(f"lfm {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`lfm predict ... | head -1`): stop quietly, as Unix tools do.
        _silence_stdout()
        return 141
    except CommandFailed as err:
        print(f"lfm {args.command}: error: {one_line(str(err))}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - the command line shows a message, not a traceback
        if os.environ.get("LFM_DEBUG"):
            raise
        print(f"lfm {args.command}: error: {type(err).__name__}: {one_line(str(err))} (LFM_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return 1


def _silence_stdout():
    """Point stdout at /dev/null so flushing it at exit raises no second BrokenPipeError."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured output)
        pass


if __name__ == "__main__":
    sys.exit(main())
