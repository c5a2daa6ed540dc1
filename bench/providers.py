"""The providers compared side by side, and how each builds the model.

  eager                 the authors' code in eager PyTorch (bench.authors.AuthorsLFM)
  eager-channels-last   the same with weights and images in channels_last (cuDNN's fastest layout; end to end
                        inference only: an anchor)
  compile-default       the authors' code under torch.compile(mode="default")
  compile-max-autotune  the same under torch.compile(mode="max-autotune") (autotuned kernels, CUDA graphs)
  torch                 lfm.LFM(backend="torch"): our pure-PyTorch reference
  triton                lfm.LFM(backend="triton"): our fused Triton kernels
All providers load one state_dict: the authors' checkpoint when it is found, else a seeded random init.
On a GPU, float32 matmuls run with torch.set_float32_matmul_precision("high") (bench/conftest.py), as a user
of torch.compile would set it.
"""
import functools
import os
from pathlib import Path

import torch

from bench.authors import AuthorsLFM
from lfm import LFM

PROVIDERS = ("eager", "eager-channels-last", "compile-default", "compile-max-autotune", "torch", "triton")
GPU_PROVIDERS = ("eager", "eager-channels-last", "compile-default", "compile-max-autotune", "triton")
# Providers measured end to end only (bench_lfm.test_inference): anchors, with no per-op or training rows.
INFERENCE_ONLY_PROVIDERS = ("eager-channels-last",)
# Batch-1 inference captured in one CUDA graph (bench_lfm.test_inference_cuda_graph): the host's launch
# cost removed, for the authors' code, its compilation and ours.
CUDA_GRAPH_PROVIDERS = ("eager", "compile-default", "triton")
# Without a GPU, Triton runs only in its interpreter and compilation would take most of the run:
# the CPU benchmarks compare our reference backend with the authors' eager code.
CPU_PROVIDERS = ("eager", "torch")
LFM_BACKENDS = ("torch", "triton")

REPO = Path(__file__).resolve().parents[1]
AUTHORS_FILES, CHECKPOINT = "lfm_official", "bs_model.pth"


def authors_files():
    """The folder of the authors' files (lfm_official/, holding bs_model.pth) under the first of $LFM_SHARED,
    ./shared and ../shared (beside the checkout) that has it, or None."""
    roots = [os.environ.get("LFM_SHARED"), REPO / "shared", REPO.parent / "shared"]
    for root in filter(None, roots):
        if (Path(root) / AUTHORS_FILES / CHECKPOINT).is_file():
            return Path(root) / AUTHORS_FILES
    return None


def checkpoint_path():
    """The authors' checkpoint, or None."""
    folder = authors_files()
    return folder / CHECKPOINT if folder else None


@functools.cache
def reference_state_dict():
    """(state_dict, where it came from) shared by every provider; loaded once."""
    path = checkpoint_path()
    if path is not None:
        return torch.load(path, weights_only=True, map_location="cpu"), f"authors' checkpoint {path}"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AuthorsLFM().state_dict(), ("random init (seed 0): the authors' checkpoint is not under "
                                           "$LFM_SHARED, ./shared or ../shared")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compiled(fn, provider: str):
    """torch.compile for a compile-* provider, with fullgraph so a graph break fails instead of
    silently timing eager code. Dynamo's cache is reset first: every case compiles the same code
    objects, and once their cache fills up Dynamo would quietly fall back to eager."""
    torch._dynamo.reset()
    return torch.compile(fn, mode=provider.removeprefix("compile-"), fullgraph=True)


def build_model(provider: str, dtype=torch.float32, device="cpu", training: bool = False):
    """The whole LFM of `provider` with the shared weights, in `dtype` on `device` (compile-* providers get
    the eager model; the benchmark compiles it). In training the LFM backends use the released dropout
    (constant p = 0.1), which is what the authors' code computes."""
    if provider in LFM_BACKENDS:
        model = LFM(dropout="released", backend=provider)
    else:
        model = AuthorsLFM()
    model.load_state_dict(reference_state_dict()[0], strict=True)
    return model.to(device=device, dtype=dtype, memory_format=memory_format(provider)).train(training)


def memory_format(provider: str):
    """The layout of `provider`'s weights and images."""
    return torch.channels_last if provider.endswith("channels-last") else torch.contiguous_format
