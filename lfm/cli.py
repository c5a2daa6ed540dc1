"""Command line: `lfm train | eval | predict | demo` (also `python -m lfm`, and `torchrun ... -m lfm`).

Problems with the input (paths, data layout, options) end with `lfm <command>: error: ...` and exit
code 2; anything unexpected with exit code 1 and no traceback unless LFM_DEBUG=1.
"""
import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path

from lfm_kernels import BACKENDS

from .data import LAYOUTS
from .engines import DEFAULT_ENGINE, ENGINES, EXPORT_FORMATS
from .errors import CommandFailed, UsageError
from .evaluate import DEFAULT_OUT as EVAL_OUT
from .images import DEFAULT_MAX_PIXELS, TEST_SIZE
from .inference import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS
from .runtime import PRECISIONS, interrupt_guard
from .train import TrainOptions
from .weights import MODEL_NAMES


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


def _shown(default) -> str:
    """A default as the command line takes it: pairs as LOW,HIGH."""
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


# How the command line reads an options field of each annotated type (tuples: a pair of their default's type).
_FIELD_TYPES = {int: int, float: float, str: str, str | None: str, int | None: _size, list | None: _names}


def _add_option_fields(p, options_class):
    """An option per field of the dataclass that carries help metadata: --name (--no-name for a flag that is on
    by default), parsed by the field's annotation, with the field's default filled in for "{default}" in its
    help. Defaults stay in the dataclass: the parser does not set them."""
    for field in dataclasses.fields(options_class):
        if "help" not in field.metadata:
            continue
        settings = dict(field.metadata, help=field.metadata["help"].format(default=_shown(field.default)))
        flag = field.name.replace("_", "-")
        if field.type is bool:
            p.add_argument(f"--no-{flag}", dest=field.name, action="store_false", **settings)
        elif field.type is tuple:
            p.add_argument(f"--{flag}", type=_pair(type(field.default[0])), **settings)
        else:
            p.add_argument(f"--{flag}", type=_FIELD_TYPES[field.type], **settings)


class _Augmentation(argparse.Action):
    """--aug blur:0.1,jpg:0.1 sets --blur-prob and --jpeg-prob (as the NPR and CNNDetection trainers' options)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .perturb import parse_augmentation

        try:
            probabilities = parse_augmentation(values)
        except UsageError as err:
            raise argparse.ArgumentError(self, str(err)) from None
        for name, probability in probabilities.items():
            setattr(namespace, name, probability)


def _add_runtime_options(p):
    """Options every command that runs a model shares."""
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available; under torchrun each "
                                    "rank takes cuda:LOCAL_RANK)")
    p.add_argument("--backend", choices=BACKENDS, help="fused ops: triton on CUDA, torch otherwise (auto)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="float32, bf16 autocast, or float64 (torch backend; slower, the same numbers on any CPU)")
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
    p.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                   help=f"{DEFAULT_ENGINE} (default: our torch backend), compile (torch.compile) or onnx (ONNX "
                        "Runtime on CPU, graph exported once and cached; pip install 'lfm[cpu]')")
    _add_runtime_options(p)
    p.set_defaults(device="auto", backend="auto", precision="float32", workers=DEFAULT_WORKERS,
                   max_pixels=DEFAULT_MAX_PIXELS, exif_transpose=False)


def _runtime_kwargs(args) -> dict:
    return dict(model_name=args.model, resize=args.resize, batch_size=args.batch_size, workers=args.workers,
                device=args.device, precision=args.precision, backend=args.backend, max_pixels=args.max_pixels,
                exif_transpose=args.exif_transpose, progress=args.progress, engine=args.engine)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lfm", description="Detect AI-generated images with LFM (BMVC 2025).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Train options default to "not given" so a resumed run can tell overrides from its saved options.
    p = commands.add_parser("train", argument_default=argparse.SUPPRESS,
                            help="train a detector (the authors' recipe by default)",
                            description="Train on a CNNDetection layout: ROOT/train and ROOT/val, each "
                                        "[<class>/]{0_real,1_fake}. Defaults are the authors' released recipe.")
    _add_option_fields(p, TrainOptions)
    p.add_argument("--aug", action=_Augmentation, metavar="KIND:P[,KIND:P]",
                   help="augmentation probabilities, e.g. blur:0.1,jpg:0.1 (sets --blur-prob, --jpeg-prob); the "
                        "blur and JPEG of lfm eval --perturb, severities drawn from --blur-sigma, --jpeg-quality")
    p.add_argument("--force", action="store_true",
                   help="start a new run in --out even if it holds other files or a run")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN exactly where it stopped")
    _add_runtime_options(p)
    p.set_defaults(func=run_train)

    p = commands.add_parser("eval", help="accuracy, AP, AUC, EER, ... per test subset, and robustness sweeps",
                            description="Test subsets in the CNNDetection layout (every folder holding "
                                        "0_real/1_fake), GenImage's (<generator>/val/{ai,nature}) or a CSV list "
                                        "(path,label[,subset]).")
    p.add_argument("--data", metavar="ROOT", nargs="+", required=True, help="test roots (folders or .csv lists)")
    p.add_argument("--layout", choices=LAYOUTS, help="the roots' layout (default: the one each root fits)")
    p.add_argument("--perturb", metavar="KIND:S1[,S2...]", action="append", default=[],
                   help="also score every image perturbed at each severity, before preprocessing: jpeg:QUALITY, "
                        "blur:SIGMA, resize:SCALE (down and back up), crop:SIZE (center); repeat for a sweep, "
                        "e.g. --perturb jpeg:95,75,50 --perturb blur:1,2")
    p.add_argument("--center-crop", type=_at_least(1), metavar="SIZE",
                   help="center crop to SIZE x SIZE after the resize (e.g. 224)")
    p.add_argument("--calibrate-on", metavar="ROOT",
                   help="choose the best-accuracy threshold on this validation root and report cal_acc with it")
    p.add_argument("--subset-depth", type=int, metavar="N",
                   help="subsets are the folders N levels below a root, merging the labeled folders beneath "
                        "(e.g. 1 for ForenSynths, whose generators hold one folder per class)")
    p.add_argument("--out", default=EVAL_OUT,
                   help=f"folder for results.csv, results.json, predictions.csv, robustness.png (default {EVAL_OUT})")
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

    p = commands.add_parser("export", help="write the eval graph as ONNX, a torch.export program or an "
                                           "AOTInductor package",
                            description="Export a model's eval graph (any batch, fixed input size) for serving "
                                        "without lfm: ONNX (ONNX Runtime), pt2 (torch.export.load) or aoti "
                                        "(a .pt2 of compiled native code, torch._inductor.aoti_load_package; "
                                        "writing it needs a C++ compiler).")
    p.add_argument("out", metavar="OUT", help="file to write (e.g. lfm.onnx, lfm.pt2)")
    p.add_argument("--weights", required=True, help="the authors' .pth or our .safetensors")
    p.add_argument("--model", choices=MODEL_NAMES,
                   help="architecture of a .pth file (default lfm); our .safetensors record their own")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="onnx, pt2 or aoti")
    p.add_argument("--size", type=_at_least(1), default=TEST_SIZE,
                   help=f"input height and width the graph takes (default {TEST_SIZE})")
    p.set_defaults(func=run_export)

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
        metric = {"acc": "accuracy", "ap": "AP"}[summary["select_by"]]
        print(f"best validation {metric} {100 * summary['best_score']:.2f} at epoch {summary['best_epoch']}; "
              f"weights in {summary['run_dir']}")
    return 0


def run_eval(args) -> int:
    from .evaluate import evaluate

    evaluate(args.weights, args.data, depth=args.subset_depth, layout=args.layout, perturbations=args.perturb,
             center_crop=args.center_crop, calibrate_on=args.calibrate_on, out=args.out, **_runtime_kwargs(args))
    return 0


def run_predict(args) -> int:
    from .predict import predict

    predict(args.weights, args.paths, as_json=args.json, heatmap_dir=args.heatmap, **_runtime_kwargs(args))
    return 0


def run_export(args) -> int:
    import torch

    from .engines import export_model
    from .weights import check_output_file, load_model

    out = Path(args.out)
    check_output_file(out, "OUT")
    if not out.parent.is_dir():
        raise UsageError(f"OUT must be a file in an existing folder, got {args.out!r}")
    model, _ = load_model(args.weights, args.model, backend="torch", command="export")
    try:
        model.check_input(torch.zeros(1, 3, args.size, args.size))
    except ValueError as err:
        raise UsageError(f"--size {args.size}: {err}") from None
    print(export_model(model, out, args.format, (args.size, args.size)))
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
    _write_paths_as_bytes()
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


def _write_paths_as_bytes():
    """A file name that is not valid in the locale's encoding reaches Python with surrogate escapes: print it
    as the bytes the file system holds (as Python does in the C locale), not as an encoding error."""
    if sys.stdout is sys.__stdout__ and getattr(sys.stdout, "errors", None) == "strict":
        sys.stdout.reconfigure(errors="surrogateescape")


def _silence_stdout():
    """Point stdout at /dev/null so flushing it at exit raises no second BrokenPipeError."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured output)
        pass


if __name__ == "__main__":
    sys.exit(main())
