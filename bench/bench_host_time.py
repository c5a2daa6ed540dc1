"""Host time of one LFM inference forward at batch 1 with every kernel launch stubbed out: the Python side of
our launchers (argument checks, launch configuration, allocations, the autograd and dispatcher layers), which
bounds batch-1 latency when it exceeds the GPU's work (goal: bench.report.HOST_TIME_GOAL_S).

Launches go through lfm_kernels.configs.observe_launches with run=False, so this runs on every machine. On a
GPU the timer's CUDA events see the host's time, the device having nothing to do but the final Linear. On CPU
the launchers take an H100/H200's launch path (configs.gpu_family("sm90") and its tiles) on CPU tensors
(TRITON_INTERPRET=1 set for the call only, so that the triton backend takes them; no kernel runs). The row
carries the kernel launches per forward.

    python -m pytest bench -k host_time
"""
import contextlib

import torch

from bench.harness import DEVICE, ON_GPU, Work, measure
from bench.report import HOST_TIME_GROUP
from bench.shapes import IMAGE_SIZE
from bench.workloads import cpu_tensors_take_the_triton_path, lfm_model
from lfm_kernels import configs


def test_host_time_per_forward(benchmark):
    model = lfm_model(torch.float32, DEVICE).eval()
    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=DEVICE)
    launches = []
    with contextlib.ExitStack() as stubbed:
        if not ON_GPU:
            for context in (cpu_tensors_take_the_triton_path(), configs.gpu_family("sm90"), configs.gpu_tile_sizes()):
                stubbed.enter_context(context)
        stubbed.enter_context(configs.observe_launches(launches.append, run=False))
        stubbed.enter_context(torch.inference_mode())
        model(images)
        per_forward = len(launches)
        measure(benchmark, model, [(images,)], Work(bytes=0, flops=0, images=1), group=HOST_TIME_GROUP, op="lfm",
                provider="triton", dtype=torch.float32, batch=1, size=IMAGE_SIZE, mode="host, launches stubbed",
                launches=per_forward)
