"""Inference engines for `lfm eval` and `lfm predict`, and `lfm export`.

  torch    our torch backend as it is: on CPU its inference path (lfm_kernels.snet_block_torch: BatchNorm
           folded, channels_last, pool blocks by cache-sized chunks, Top-K without a full sort); on CUDA
           the Triton kernels, replayed from a CUDA graph captured per input shape (CudaGraphRunner).
  compile  torch.compile of the same model (Inductor; on CPU it needs a C++ compiler, without one the
           torch engine runs, with a warning), called on a few images at a time on CPU (CALL_BYTES).
  onnx     the eval graph exported once to ONNX (cached by a hash of the weights and the input size) and
           run by ONNX Runtime on CPU (`pip install lfm[cpu]`), a few images at a time.

Every engine gives the authors' logits within 1e-4 (tests/test_engines.py).
"""
import contextlib
import hashlib
import io
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import CommandFailed, UsageError, warn
from .weights import atomic_write, check_output_file

ENGINES = ("torch", "compile", "onnx")
DEFAULT_ENGINE = "torch"
# pt2: a torch.export program (torch.export.load); aoti: the same compiled ahead of time by AOTInductor into
# a .pt2 package of native code (torch._inductor.aoti_load_package; needs a C++ compiler to write it).
EXPORT_FORMATS = ("onnx", "pt2", "aoti")
# Exported graphs take any batch up to this size; height and width are fixed at export.
MAX_EXPORT_BATCH = 4096


# ONNX Runtime and Inductor compute a whole input per call, so a batch of 256x256 images writes its
# first conv's map (64 channels, 16.6 MB per image) to memory and reads it back. Given at most this many
# bytes of that map per call, about what a small machine's L3 cache holds, both run about 1.7x faster
# at batch 8 on 2 cores (measured interleaved); the torch engine chunks inside its blocks instead. A
# GPU wants whole batches: compile there is not chunked (and onnx runs on CPU only).
CALL_BYTES = 16 << 20


def images_per_call(x: torch.Tensor) -> int:
    """How many images of the (B, 3, H, W) batch x one call of an exported or compiled graph takes."""
    first_map = 64 * max(x.shape[2] - 1, 1) * max(x.shape[3] - 1, 1) * 4
    return max(1, CALL_BYTES // first_map)


class Chunked:
    """Calls `run` on slices of a batch of images_per_call(x) images and concatenates the logits."""

    def __init__(self, run):
        self.run = run

    def eval(self):
        self.run.eval()
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = images_per_call(x)
        return self.run(x) if x.shape[0] <= n else torch.cat([self.run(part) for part in x.split(n)])


def check_engine(engine: str, resize, precision: str):
    """Refuse engine choices that cannot run, before any image is read."""
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "onnx":
        if resize is None:
            raise UsageError("--engine onnx runs a graph exported for one input size; it does not go with "
                             "--no-resize (use --engine torch or compile)")
        if precision != "float32":
            raise UsageError(f"--engine onnx computes in float32; it does not go with --precision {precision}")
        onnx_runtime()


def onnx_runtime():
    """The onnxruntime module, or a UsageError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("--engine onnx needs ONNX Runtime: pip install 'lfm[cpu]'") from None
    return onnxruntime


def cxx_compiler():
    """The C++ compiler torch.compile's CPU code generation would use (CXX, else c++/g++/clang++), or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of the model's class, its state_dict (names, dtypes, shapes, values) and torch's version."""
    digest = hashlib.sha256(f"{type(model).__name__} {getattr(model, 'k', '')} {torch.__version__}".encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where exported graphs are kept: $LFM_CACHE, else $XDG_CACHE_HOME/lfm, else ~/.cache/lfm."""
    if os.environ.get("LFM_CACHE"):
        return Path(os.environ["LFM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lfm"


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings of their own; a command prints its own lines only."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model on CPU in eval mode with every op on the torch backend (portable aten ops, no Triton)."""
    import copy

    copied = copy.deepcopy(model).cpu().eval()
    for module in copied.modules():
        if hasattr(module, "backend"):
            module.backend = "torch"
    return copied


def export_model(model: torch.nn.Module, path, fmt: str, size: tuple[int, int]) -> Path:
    """Write the eval graph of `model` for (B, 3, *size) inputs, any batch B, as ONNX, as a torch.export
    program (.pt2, loaded with torch.export.load) or as an AOTInductor package (.pt2, loaded with
    torch._inductor.aoti_load_package). Written aside and renamed, so a reader never sees half; a `path`
    that exists and is not a regular file is refused."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if fmt == "aoti" and cxx_compiler() is None:
        raise UsageError("--format aoti compiles C++ and no compiler was found (set CXX); --format pt2 needs none")
    path = Path(path)
    check_output_file(path, "OUT")
    model = _export_copy(model)
    example = torch.zeros(2, 3, *size)
    model.check_input(example)
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)}}

    def write(tmp):
        with torch.no_grad(), _quiet():
            if fmt == "pt2":
                torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dynamic), tmp)
            elif fmt == "aoti":
                from torch._inductor import aoti_compile_and_package

                program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
                aoti_compile_and_package(program, package_path=str(tmp))
            else:
                torch.onnx.export(model, (example,), tmp, dynamo=True, dynamic_shapes=dynamic, input_names=["x"],
                                  output_names=["logits"], external_data=False)

    try:
        # AOTInductor writes its package only to a name ending in .pt2.
        atomic_write(path, write, suffix=".pt2" if fmt == "aoti" else "")
    except ImportError as err:
        raise UsageError(f"--format onnx needs the onnx and onnxscript packages ({err}): pip install 'lfm[cpu]'"
                         ) from None
    return path


class OnnxRunner:
    """Runs a model's exported ONNX graph with ONNX Runtime; called like the model (float (B, 3, H, W)
    -> (B, 1) logits), with the model's own input checks."""

    def __init__(self, model: torch.nn.Module, size: tuple[int, int]):
        ort = onnx_runtime()
        self.model, self.size = model, tuple(size)
        path = cache_dir() / "onnx" / f"{weights_hash(model)}-{size[0]}x{size[1]}.onnx"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            export_model(model, path, "onnx", self.size)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        # Without its arena ONNX Runtime frees each batch's activations, which keeps `lfm predict` under
        # 1.5 GB at the default batch (1.6 GB with the arena), at no measurable cost in speed.
        options.enable_cpu_mem_arena = False
        # Its threads sleep between runs instead of spinning, which took the cores from the decoding
        # workers of `lfm predict` (and from torch, in a benchmark that interleaves engines).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    def eval(self):
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.model.check_input(x)
        if tuple(x.shape[2:]) != self.size:
            raise ValueError(f"the ONNX graph takes {self.size[0]}x{self.size[1]} inputs, got "
                             f"{x.shape[2]}x{x.shape[3]}")
        n = images_per_call(x)
        x = x.detach().float().cpu().contiguous().numpy()
        logits = [self.session.run(None, {"x": x[i:i + n]})[0] for i in range(0, len(x), n)]
        return torch.from_numpy(np.concatenate(logits))


def capture_cuda_graph(fn, static_inputs, warmup_calls: int = 2):
    """(graph, output, weights) of fn(*static_inputs) captured in a CUDA graph after warm-up calls on a side
    stream (kernels compiled, allocations made), under lfm_kernels.frozen.frozen_weights: the warm-up
    derives the ops' weights once (packed, BatchNorm folded) and the graph replays the forward's kernels
    only, reading those. Keep `weights` (the derived tensors) as long as the graph, and the parameters
    unchanged while it is replayed (inference)."""
    from lfm_kernels.frozen import frozen_weights

    device = static_inputs[0].device
    weights = {}
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with frozen_weights(weights), torch.cuda.stream(side):
        for _ in range(warmup_calls):
            fn(*static_inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with frozen_weights(weights), torch.cuda.graph(graph):
        output = fn(*static_inputs)
    return graph, output, weights


class CudaGraphRunner:
    """The model's inference replayed from a CUDA graph, one captured per input shape and dtype (at most
    MAX_GRAPHS of them; other shapes run as they are): a replay costs the host a few microseconds, where
    a forward's Python and launches cost far more than the GPU's work at batch 1. Captured by
    capture_cuda_graph, so that the graph records only the forward's kernels: the weights must not
    change while the runner is in use (inference)."""

    MAX_GRAPHS = 8

    def __init__(self, model: torch.nn.Module):
        self.model, self.graphs = model, {}

    def eval(self):
        self.model.eval()
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.graphs:
            if len(self.graphs) >= self.MAX_GRAPHS:
                return self.model(x)
            self.graphs[key] = self._capture(x)
        static_in, static_out, graph, _weights = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: torch.Tensor):
        static_in = x.detach().clone()
        with torch.no_grad():
            graph, static_out, weights = capture_cuda_graph(self.model, [static_in])
        return static_in, static_out, graph, weights


def prepare(model: torch.nn.Module, engine: str, device: torch.device, size, command: str):
    """What scores batches for `engine`: the model itself (in a CudaGraphRunner on CUDA), torch.compile of
    it, or an OnnxRunner."""
    if engine == "onnx":
        if device.type != "cpu":
            raise UsageError(f"--engine onnx runs on CPU (device is {device}); use --device cpu or --engine torch")
        try:
            return OnnxRunner(model, size)
        except UsageError:
            raise
        except Exception as err:  # noqa: BLE001 - the exporter's errors vary; the message names the cause
            raise CommandFailed(f"exporting the model to ONNX failed: {type(err).__name__}: {err}") from err
    if engine == "compile":
        if device.type == "cpu" and cxx_compiler() is None:
            warn(command, "--engine compile needs a C++ compiler on CPU and none was found (set CXX); "
                          "running --engine torch")
            return model
        compiled = torch.compile(model, dynamic=None)
        return Chunked(compiled) if device.type == "cpu" else compiled
    return CudaGraphRunner(model) if device.type == "cuda" else model
