"""Host time of one LFM inference forward at batch 1 with every kernel launch stubbed out: the Python side of
our launchers (argument checks, launch configuration, allocations, the autograd and dispatcher layers), which
bounds batch-1 latency when it exceeds the GPU's work (goal: bench.report.HOST_TIME_GOAL_S).

Launches go through lfm_kernels.configs.observe_launches with run=False, so this runs on every machine. On a
GPU the timer's CUDA events see the host's time, the device having nothing to do but the final Linear. On CPU
the launchers take an H100/H200's launch path (configs.gpu_family("sm90") and its tiles) on the meta device:
tensors without storage, so each tensor op costs its dispatch only, as a GPU op's host side does (on CPU
tensors the host would also do the weight packing's copies, which a GPU runs as kernels, and allocate without
a caching allocator). Meta's Linear is a Python decomposition (about 300 us, which no GPU pays), so the final
Linear runs on CPU. The row carries the kernel launches per forward.

    python -m pytest bench -k host_time
"""
import contextlib

import torch
from torch import nn

from bench.harness import ON_GPU, Work, measure
from bench.report import HOST_TIME_GROUP
from bench.shapes import IMAGE_SIZE
from bench.workloads import lfm_model
from lfm_kernels import configs


class LinearOnCPU(nn.Module):
    """A meta model's final Linear, run on CPU on a zero input of the same shape (made once: a GPU's Linear
    allocates no input)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = nn.Linear(linear.in_features, linear.out_features)
        self.cpu_input = None

    def forward(self, x):
        if self.cpu_input is None or self.cpu_input.shape != x.shape:
            self.cpu_input = torch.zeros(x.shape, dtype=x.dtype)
        return self.linear(self.cpu_input)


def test_host_time_per_forward(benchmark):
    device = torch.device("cuda" if ON_GPU else "meta")
    model = lfm_model(torch.float32, device).eval()
    if not ON_GPU:
        model.fc1 = LinearOnCPU(model.fc1)
    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    launches = []
    with contextlib.ExitStack() as stubbed:
        if not ON_GPU:
            stubbed.enter_context(configs.gpu_family("sm90"))
            stubbed.enter_context(configs.gpu_tile_sizes())
        stubbed.enter_context(torch.inference_mode())
        with configs.observe_launches(lambda launch: launches.append(launch.name), run=False):
            model(images)
        # Names of one forward only: a list of every launch's arguments would grow through the timing.
        stubbed.enter_context(configs.observe_launches(run=False))
        measure(benchmark, model, [(images,)], Work(bytes=0, flops=0, images=1), group=HOST_TIME_GROUP, op="lfm",
                provider="triton", dtype=torch.float32, batch=1, size=IMAGE_SIZE, mode="host, launches stubbed",
                launches=len(launches))
