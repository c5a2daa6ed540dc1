"""Building a detector by name, and reading and writing weights and other files safely.

Weights files: the authors' `.pth` (a bare state_dict, or one wrapped as {"model": state_dict}, keys
with or without DataParallel's `module.` prefix), always read with torch.load(weights_only=True) on
CPU; and our `.safetensors`, whose metadata records the architecture so it loads with no options.
Every write is atomic: a new temporary file in the same folder, flushed to disk, then renamed over the
target, so an interrupted run never leaves a half-written file behind; a target that is not a regular
file (a FIFO, a device, a symlink) is refused, never replaced.
"""
import inspect
import itertools
import json
import os
import re
import secrets
import stat
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError, warn
from .model import LFM, LFMGAP, SCORE_CHANNELS
from .npr import NPR

MODEL_NAMES = ("lfm", "lfm-gap", "npr")
CONFIG_KEY = "lfm_config"  # safetensors metadata entry: JSON of the architecture and its options
LFM_OPTIONS = ("k", "dropout", "pmin", "pmax", "random_k_weight")
DEFAULT_K = inspect.signature(LFM).parameters["k"].default  # the released model's Top-K


def build_model(config: dict, backend=None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh model from a config such as {"model": "lfm", "k": 16, "dropout": "paper"}, its parameters
    drawn in `dtype` (float32 draws differ in their last bits between CPU instruction sets; float64 ones
    by far less)."""
    name = config.get("model", "lfm")
    if name not in MODEL_NAMES:
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if name == "lfm":
            return LFM(**{key: config[key] for key in LFM_OPTIONS if key in config}, backend=backend)
        return LFMGAP(backend=backend) if name == "lfm-gap" else NPR(backend=backend)
    finally:
        torch.set_default_dtype(previous)


def check_output_file(path, option: str = "output"):
    """Refuse a target that exists and is not a regular file (a FIFO, a device, a symlink, a folder): a write
    renamed over it would replace it, and one through it would write where the user did not ask."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        raise UsageError(f"{option} {path} exists and is not a regular file ({kind}); refusing to replace it")


_FILE_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
               (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def claim_new_file(folder: Path, stem: str, suffix: str) -> Path:
    """Create an empty file folder/<stem><suffix>, else <stem>_1<suffix>, ..., the first name that nothing
    holds (O_EXCL: not even a dangling symlink), and return it: a file this run may replace."""
    for n in itertools.count():
        path = folder / f"{stem if n == 0 else f'{stem}_{n}'}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path


def atomic_write(path, write, suffix: str = ""):
    """Call write(temporary_path), flush it to disk, then rename it to `path`. The temporary file is created
    new (O_EXCL, a random name ending in `suffix`) in the same folder, so nothing planted there is written
    through; a `path` that exists and is not a regular file is refused."""
    path = Path(path)
    check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp{suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_output_folder(path, option: str) -> Path:
    """Create the folder an option names, if needed, and check that files can be written there: done
    before any work, so a bad target never costs a run."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot create the folder ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the folder is not writable")
    return path


def write_text(path, text: str):
    """UTF-8, except that a path the file system holds in another encoding (decoded by Python with surrogate
    escapes) is written as its own bytes, so it names the same file when read back."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_weights(model: nn.Module, path, config: dict, **metadata):
    """Write the state_dict as safetensors, with the architecture config (and any extra string
    metadata, e.g. the epoch) in its header."""
    from safetensors.torch import save

    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    header = {CONFIG_KEY: json.dumps(config), **{key: str(value) for key, value in metadata.items()}}
    # Serialized in memory and written by us: safetensors' own save_file creates files readable by the owner only.
    atomic_write(path, lambda tmp: tmp.write_bytes(save(state, metadata=header)))


def _torch_load_problem(err: Exception, path: Path) -> str:
    """Why torch.load(weights_only=True) refused a file, in one short sentence."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if found:
        return (f"it holds a pickled {found.group(1)} object, not plain tensors (such files are never unpickled; "
                "save a state_dict)")
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":  # torch.save writes zip archives
            return "a PyTorch checkpoint that is truncated or corrupt"
    return "not a PyTorch checkpoint"


def read_torch_file(path, what: str):
    """torch.load(path, weights_only=True) on CPU, or a UsageError naming the file and what is wrong."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - corrupt files or pickles that are not plain tensors
        raise UsageError(f"cannot read {what} {path}: {_torch_load_problem(err, Path(path))}") from None


def _read_safetensors(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {name: f.get_tensor(name) for name in f.keys()}
            config = (f.metadata() or {}).get(CONFIG_KEY)
    except Exception as err:  # noqa: BLE001 - not a safetensors file, or a damaged one
        raise UsageError(f"cannot read weights {path}: not a safetensors file, or a damaged one "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if config is None:
        return state, None
    try:
        config = json.loads(config)
    except ValueError:
        config = None
    if not isinstance(config, dict) or config.get("model", "lfm") not in MODEL_NAMES:
        raise UsageError(f"{path} records an architecture that is not one of ours in its {CONFIG_KEY!r} metadata")
    return state, config


def read_state_dict(path):
    """(state_dict, config or None) from a .safetensors or a .pth/.pt file."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a weights file")
    if not path.exists():
        raise UsageError(f"no such weights file: {path}")
    if not path.is_file():
        raise UsageError(f"cannot read weights {path}: not a regular file")
    if path.suffix == ".safetensors":
        state, config = _read_safetensors(path)
    else:
        state, config = read_torch_file(path, "weights"), None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UsageError(f"{path} holds no state_dict (expected a dict of tensors, bare or under 'model')")
        if state and all(name.startswith("module.") for name in state):
            state = {name[len("module."):]: t for name, t in state.items()}
    broken = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise UsageError(f"{path} holds NaN or infinite values in {', '.join(broken[:3])}"
                         f"{' and more' if len(broken) > 3 else ''}")
    return state, config


def infer_k(state: dict, path, command: str) -> int:
    """LFM's K from the width of a bare checkpoint's head, 1 x (64 * K); a K other than the released 16
    is reported."""
    head = state.get("fc1.weight")
    if head is None:
        return DEFAULT_K  # check_head refuses it
    if head.dim() != 2 or head.shape[0] != 1 or head.shape[1] == 0 or head.shape[1] % SCORE_CHANNELS:
        raise UsageError(f"{path}: the head fc1.weight has shape {tuple(head.shape)}, not 1 x (64 * K), so it is no "
                         "LFM checkpoint; choose the architecture with --model")
    k = head.shape[1] // SCORE_CHANNELS
    if k != DEFAULT_K:
        warn(command, f"{path}: K = {k} inferred from its head fc1.weight {tuple(head.shape)} (the released model has "
                      f"K = {DEFAULT_K})")
    return k


def check_head(state: dict, config: dict, path):
    """Check an LFM config's K against the head the file holds, before anything is built: the model's size
    grows with K, so a K from untrusted metadata must match tensors that are already in memory."""
    if config["model"] != "lfm":
        return
    k = config.get("k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"{path} records an architecture that cannot be built ({config}): k must be an int >= 1, "
                         f"got {k!r}")
    head = state.get("fc1.weight")
    if head is None:
        raise UsageError(f"{path} holds no head fc1.weight to check k = {k} against, so it is no LFM checkpoint; "
                         "choose the architecture with --model")
    if tuple(head.shape) != (1, SCORE_CHANNELS * k):
        raise UsageError(f"{path}: its head fc1.weight is {tuple(head.shape)}, but its architecture ({config}) "
                         f"needs {(1, SCORE_CHANNELS * k)}")


def load_model(path, model_name: str | None = None, backend=None, command: str = "predict",
               dtype: torch.dtype = torch.float32):
    """(model in eval mode with parameters in `dtype`, config) from a weights file. Our safetensors name
    their architecture; other files are `model_name` ("lfm" by default, K read from the head's width)."""
    state, config = read_state_dict(path)
    if config is None:
        config = {"model": model_name or "lfm"}
        if config["model"] == "lfm":
            config["k"] = infer_k(state, path, command)
    elif model_name is not None and model_name != config["model"]:
        raise UsageError(f"{path} holds a {config['model']!r} model, not {model_name!r}")
    check_head(state, config, path)
    try:
        model = build_model(config, backend=backend, dtype=dtype)
    except (ValueError, TypeError) as err:
        raise UsageError(f"{path} records an architecture that cannot be built ({config}): {err}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UsageError(f"{path} does not fit model {config['model']!r}: {detail}; "
                         "choose the architecture with --model") from None
    return model.eval(), config
