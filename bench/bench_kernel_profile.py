"""Where the device time of one call goes, kernel by kernel: our inference at 256x256 (batch LARGE_BATCH on a
GPU) and our training step (batch TRAIN_BATCH at 224x224), per dtype, the cases of bench_lfm. After the
warm-up, torch.profiler records PROFILED_CALLS calls; each case becomes one "profile" record (bench.results):
per kernel its launches and device seconds per call, longest first, and their sum. The report
(bench.report.format_profiles) sets that sum beside the case's timed median: the share of the call the
device was busy, and so whether the host or idle gaps bound it.

On a GPU the kernels are CUDA kernels (ours by their Triton names, cuDNN's, ATen's, copies and memsets by
theirs); on CPU, where our kernels do not run, each ATen op's self CPU time of the torch provider.

    python -m pytest bench -k kernel_profile
"""
import torch
from torch.autograd import DeviceType

from bench import results
from bench.bench_lfm import inference_case, training_case
from bench.harness import DEVICE, INFERENCE_BATCHES, ON_GPU, PROFILES, TRAIN_BATCH, WARMUP_CALLS
from bench.providers import dtype_name
from bench.shapes import IMAGE_SIZE, TRAIN_SIZE

PROFILED_CALLS = 5


def kernel_times(step, input_sets, calls: int = PROFILED_CALLS) -> list:
    """[(kernel, launches per call, seconds per call)] of step(*inputs) over `calls` calls (after WARMUP_CALLS
    more), longest first: CUDA kernels' device time on a GPU, each CPU op's self time elsewhere."""
    for i in range(WARMUP_CALLS):
        step(*input_sets[i % len(input_sets)])
    activity = torch.profiler.ProfilerActivity.CUDA if ON_GPU else torch.profiler.ProfilerActivity.CPU
    if ON_GPU:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=[activity]) as profile:
        for i in range(calls):
            step(*input_sets[i % len(input_sets)])
        if ON_GPU:
            torch.cuda.synchronize()
    kernels = []
    for event in profile.key_averages():
        if ON_GPU:
            seconds = event.self_device_time_total / 1e6 if event.device_type == DeviceType.CUDA else 0.0
        else:
            seconds = event.self_cpu_time_total / 1e6
        if seconds > 0:
            kernels.append((event.key, event.count / calls, seconds / calls))
    return sorted(kernels, key=lambda kernel: -kernel[2])


def record_profile(test: str, kernels, **labels) -> dict:
    """The profile record of one case (its labels as a benchmark row's: provider, dtype, batch, size, mode)."""
    labels = {k: dtype_name(v) if isinstance(v, torch.dtype) else v for k, v in labels.items()}
    profile = dict(labels, test=test, device=DEVICE.type, calls=PROFILED_CALLS,
                   total_s=sum(seconds for _, _, seconds in kernels),
                   kernels=[dict(name=name, launches=launches, seconds=seconds) for name, launches, seconds in kernels])
    PROFILES.append(profile)
    results.record("profile", **profile)
    return profile


def test_kernel_profile_inference(request, provider, dtype):
    batch = INFERENCE_BATCHES[-1]
    model, input_sets, _ = inference_case(provider, dtype, batch, IMAGE_SIZE)
    with torch.inference_mode():
        kernels = kernel_times(model, input_sets)
    record_profile(request.node.nodeid, kernels, op="lfm", provider=provider, dtype=dtype, batch=batch,
                   size=IMAGE_SIZE, mode="inference")


def test_kernel_profile_training(request, provider, dtype):
    step, input_sets, _ = training_case(provider, dtype)
    record_profile(request.node.nodeid, kernel_times(step, input_sets), op="lfm", provider=provider, dtype=dtype,
                   batch=TRAIN_BATCH, size=TRAIN_SIZE, mode="training step")


# Ours: the fused kernels on a GPU, the torch backend on CPU (bench.providers.CPU_PROVIDERS).
test_kernel_profile_inference.providers = test_kernel_profile_training.providers = ["triton", "torch"]
