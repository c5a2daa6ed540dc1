"""Host time of one LFM inference forward at batch 1, and of one training step, with every kernel launch stubbed
out: the Python side of our launchers (argument checks, launch configuration, allocations, the autograd and
dispatcher layers), which bounds batch-1 latency when it exceeds the GPU's work (goal:
bench.report.HOST_TIME_GOAL_S), and bounds a training step's speed when it exceeds the step's device time.

Launches go through lfm_kernels.configs.observe_launches with run=False, so this runs on every machine. On a
GPU the timer's CUDA events see the host's time, the device having nothing to do but the final Linear. On CPU
the launchers take an H100/H200's launch path (configs.gpu_family("sm90") and its tiles) on the meta device:
tensors without storage, so each tensor op costs its dispatch only, as a GPU op's host side does (on CPU
tensors the host would also do the weight packing's copies, which a GPU runs as kernels, and allocate without
a caching allocator). Meta's Linear is a Python decomposition (about 300 us, which no GPU pays), so the final
Linear runs on CPU. The row carries the kernel launches per forward.

The training step (forward, BCE-with-logits, backward; the fused optimizer step adds one launch) runs at batch
TRAIN_BATCH and TRAIN_SIZE on a GPU, where the torch ops around our kernels (loss, casts, the weight packing's
copies) run on the device asynchronously. On CPU meta tensors cannot take it (their autograd and losses run
Python decompositions no GPU pays), so it runs on CPU tensors at batch 2 and 64x64, where those torch ops
compute for real: about a third of the row is the weight packing's copies, which a GPU runs as kernels.

    python -m pytest bench -k host_time
"""
import contextlib

import torch
from torch import nn

from bench.harness import ON_GPU, Work, measure
from bench.report import HOST_TIME_GROUP
from bench.shapes import IMAGE_SIZE, TRAIN_BATCH, TRAIN_SIZE
from bench.workloads import cpu_tensors_take_the_triton_path, lfm_model, training_step
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


def test_host_time_per_training_step(benchmark, dtype):
    device = torch.device("cuda" if ON_GPU else "cpu")
    batch, size = (TRAIN_BATCH, TRAIN_SIZE) if ON_GPU else (2, 64)
    model = lfm_model(dtype, device, training=True)
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    launches = []
    with contextlib.ExitStack() as stubbed:
        if not ON_GPU:
            stubbed.enter_context(cpu_tensors_take_the_triton_path())
            stubbed.enter_context(configs.gpu_family("sm90"))
            stubbed.enter_context(configs.gpu_tile_sizes())
        with configs.observe_launches(lambda launch: launches.append(launch.name), run=False):
            training_step(model, images=images, aux=False)
        stubbed.enter_context(configs.observe_launches(run=False))
        measure(benchmark, lambda x: training_step(model, images=x, aux=False), [(images,)],
                Work(bytes=0, flops=0, images=batch), group=HOST_TIME_GROUP, op="lfm", provider="triton", dtype=dtype,
                batch=batch, size=size, mode="training step host, launches stubbed", launches=len(launches))
