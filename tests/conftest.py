import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton_interpreter_compat  # noqa: E402

triton_interpreter_compat.apply()  # triton 3.6's interpreter on numpy >= 2.4 (the GPU machines' stack)

SHARED = Path(os.environ.get("LFM_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "lfm_official"


@pytest.fixture(scope="session")
def official():
    """The authors' checkpoint and reference outputs from ../shared (skipped when absent)."""
    if not (SHARED / "bs_model.pth").exists():
        pytest.skip(f"authors' reference files not found under {SHARED} (set LFM_SHARED to the shared folder)")
    load = dict(weights_only=True, map_location="cpu")
    return {
        "dir": SHARED,
        "state_dict": torch.load(SHARED / "bs_model.pth", **load),
        "outputs": torch.load(SHARED / "reference_outputs.pt", **load),
    }


@pytest.fixture(scope="session")
def authors_logits(official):
    """For the authors' reference inputs ("x224", "x256"): (input, the authors' eager code's float32 logits on this
    machine, its float64 logits: the truth). The stored float32 logits came from another machine's kernels."""
    from utils import authors_outputs

    result = {}
    for size in ("x224", "x256"):
        x = official["outputs"][size]
        result[size] = (x, *(authors_outputs(official["state_dict"], x, dtype)["logits"]
                             for dtype in (torch.float32, torch.float64)))
    return result


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["interpreter tiles", pytest.param("sm80 tiles", marks=pytest.mark.slow), "sm90 tiles"])
def tiles(request):
    """Run a test with the interpreter's large tiles and with the tile sizes each GPU family gets (more
    programs, loops over channel blocks, several candidate chunks, and the splits that give every SM of
    a GPU a program at small batch: the head's channel split, the rank merge): results must not depend
    on them."""
    from lfm_kernels.configs import gpu_family, gpu_tile_sizes

    if request.param == "interpreter tiles":
        yield request.param
    else:
        with gpu_family(request.param.split()[0]), gpu_tile_sizes():
            yield request.param


@pytest.fixture
def small_selection_tiles(monkeypatch):
    """Top-K selection with 16-position chunks and merges of 64 candidates, so that the reduction passes run on
    small maps. Selection's launch plans are memoized: made again under the patch and dropped after it."""
    from lfm_kernels import selection

    plans = (selection._reduce_plan, selection._chunk_plan, selection._merge_plan)
    for plan in plans:
        plan.cache_clear()
    monkeypatch.setattr(selection, "chunk_size", lambda n: 16)
    monkeypatch.setattr(selection, "merge_slots", lambda: 64)
    yield
    for plan in plans:
        plan.cache_clear()


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A randomly initialized LFM (seed 0), saved as our safetensors: the CLI tests' weights file."""
    from lfm import LFM
    from lfm.weights import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "lfm.safetensors"
    save_weights(LFM(), path, {"model": "lfm", "k": 16})
    return path
