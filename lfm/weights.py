"""Building a detector by name, and reading and writing weights and other files safely.

Weights files: the authors' `.pth` (a bare state_dict, or one wrapped as {"model": state_dict}, keys
with or without DataParallel's `module.` prefix), always read with torch.load(weights_only=True) on
CPU; and our `.safetensors`, whose metadata records the architecture so it loads with no options.
Every write is atomic: a temporary file in the same folder, flushed to disk, then renamed over the
target, so an interrupted run never leaves a half-written file behind.
"""
import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .model import LFM, LFMGAP, SCORE_CHANNELS
from .npr import NPR

MODEL_NAMES = ("lfm", "lfm-gap", "npr")
CONFIG_KEY = "lfm_config"  # safetensors metadata entry: JSON of the architecture and its options
LFM_OPTIONS = ("k", "dropout", "pmin", "pmax", "random_k_weight")


def build_model(config: dict, backend=None) -> nn.Module:
    """A fresh model from a config such as {"model": "lfm", "k": 16, "dropout": "paper"}."""
    name = config.get("model", "lfm")
    if name == "lfm":
        return LFM(**{key: config[key] for key in LFM_OPTIONS if key in config}, backend=backend)
    if name == "lfm-gap":
        return LFMGAP(backend=backend)
    if name == "npr":
        return NPR(backend=backend)
    raise UsageError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def atomic_write(path, write):
    """Call write(temporary_path), flush it to disk, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str):
    atomic_write(path, lambda tmp: tmp.write_text(text))


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


def read_state_dict(path):
    """(state_dict, config or None) from a .safetensors or a .pth/.pt file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such weights file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                state = {name: f.get_tensor(name) for name in f.keys()}
                config = (f.metadata() or {}).get(CONFIG_KEY)
            return state, (json.loads(config) if config else None)
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - corrupt files or pickles that are not plain tensors
        raise UsageError(f"cannot read weights {path}: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} holds no state_dict (expected a dict of tensors, bare or under 'model')")
    if state and all(name.startswith("module.") for name in state):
        state = {name[len("module."):]: t for name, t in state.items()}
    return state, None


def load_model(path, model_name: str | None = None, backend=None):
    """(model in eval mode, config) from a weights file. Our safetensors name their architecture;
    other files are `model_name` ("lfm" by default, K read from the head's width)."""
    state, config = read_state_dict(path)
    if config is None:
        config = {"model": model_name or "lfm"}
        if config["model"] == "lfm" and "fc1.weight" in state:
            config["k"] = max(1, state["fc1.weight"].shape[1] // SCORE_CHANNELS)
    elif model_name is not None and model_name != config["model"]:
        raise UsageError(f"{path} holds a {config['model']!r} model, not {model_name!r}")
    model = build_model(config, backend=backend)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UsageError(f"{path} does not fit model {config['model']!r}: {detail}; "
                         "choose the architecture with --model") from None
    return model.eval(), config
