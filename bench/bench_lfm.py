"""End to end: inference at batch 1, 32 and 256 at 256x256 and 224x224, batch-1 inference captured in a CUDA
graph, and one training step (zero_grad, forward, BCE-with-logits, backward, fused Adam) at batch 32 and
224x224 (the authors' training crop)."""
import functools

import pytest
import torch
import torch.nn.functional as F

from bench.harness import (
    DEVICE,
    INFERENCE_BATCHES,
    ON_GPU,
    TRAIN_BATCH,
    Work,
    count_flops,
    cuda_graphed,
    input_rotation,
    measure,
    timed_fn,
    total_bytes,
)
from bench.providers import CUDA_GRAPH_PROVIDERS, GPU_PROVIDERS, PROVIDERS, build_model, memory_format
from bench.report import CUDA_GRAPH_GROUP, INFERENCE_GROUP, TRAINING_GROUP
from bench.shapes import IMAGE_SIZE, SIZES, TRAIN_SIZE


@functools.cache
def flops_per_image(size: int, training: bool) -> int:
    """Conv and matmul FLOPs per image of the authors' model (forward, or forward + backward)."""
    model = build_model("eager", torch.float32, DEVICE, training)
    x = torch.randn(2, 3, size, size, device=DEVICE)

    def run(x):
        out = model(x)
        if training:
            out.sum().backward()

    return count_flops(run, x) // 2


def inference_case(provider, dtype, batch, size):
    """(model, rotating input sets in the provider's layout, minimal work) of end-to-end inference."""
    model = build_model(provider, dtype, DEVICE)
    layout = memory_format(provider)
    input_sets = input_rotation(lambda: (torch.randn(batch, 3, size, size, device=DEVICE, dtype=dtype).contiguous(
        memory_format=layout),))
    # Minimal traffic: the images and every parameter and buffer read once, the logits written once.
    moved = total_bytes([*input_sets[0], *model.parameters(), *model.buffers()]) + batch * dtype.itemsize
    return model, input_sets, Work(moved, batch * flops_per_image(size, training=False), batch)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", INFERENCE_BATCHES)
def test_inference(benchmark, provider, dtype, batch, size):
    model, input_sets, work = inference_case(provider, dtype, batch, size)
    with torch.inference_mode():
        measure(benchmark, timed_fn(provider, model), input_sets, work, group=INFERENCE_GROUP, op="lfm",
                provider=provider, dtype=dtype, batch=batch, size=size, mode="inference")


test_inference.providers = PROVIDERS  # the channels_last anchor too


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU")
def test_inference_cuda_graph(benchmark, provider, dtype):
    """Batch 1 as `lfm predict` on one photo with the host's launch cost removed: each call copies the image
    into the graph's input and replays the whole forward."""
    model, input_sets, work = inference_case(provider, dtype, 1, IMAGE_SIZE)
    with torch.inference_mode():
        graphed = cuda_graphed(timed_fn(provider, model), input_sets[0])
        measure(benchmark, graphed, input_sets, work, group=CUDA_GRAPH_GROUP, op="lfm", provider=provider,
                dtype=dtype, batch=1, size=IMAGE_SIZE, mode="inference, CUDA graph")


test_inference_cuda_graph.providers = [p for p in GPU_PROVIDERS if p in CUDA_GRAPH_PROVIDERS]


def training_case(provider, dtype):
    """(step, rotating input sets, minimal work) of one training step: zero_grad, forward, BCE-with-logits,
    backward, fused Adam."""
    model = build_model(provider, dtype, DEVICE, training=True)
    forward = timed_fn(provider, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999), fused=True)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(forward(x), y).backward()
        optimizer.step()

    input_sets = input_rotation(lambda: (
        torch.randn(TRAIN_BATCH, 3, TRAIN_SIZE, TRAIN_SIZE, device=DEVICE, dtype=dtype),
        torch.randint(0, 2, (TRAIN_BATCH, 1), device=DEVICE).to(dtype)))
    # Minimal traffic: the batch read once; each parameter, its two Adam moments and each buffer read
    # and written once (gradients never leave the chip).
    state = 3 * total_bytes(model.parameters()) + total_bytes(model.buffers())
    work = Work(total_bytes(input_sets[0]) + 2 * state, TRAIN_BATCH * flops_per_image(TRAIN_SIZE, training=True),
                TRAIN_BATCH)
    return step, input_sets, work


def test_training_step(benchmark, provider, dtype):
    step, input_sets, work = training_case(provider, dtype)
    measure(benchmark, step, input_sets, work, group=TRAINING_GROUP, op="lfm", provider=provider, dtype=dtype,
            batch=TRAIN_BATCH, size=TRAIN_SIZE, mode="training step")
