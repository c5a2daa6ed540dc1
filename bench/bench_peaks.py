"""The device's measured peaks, in the same run as the other benchmarks: a device-to-device copy gives
the copy bandwidth, a large matmul the matmul peak per dtype (float32 through TF32, as cuDNN runs
float32 convolutions by default). The report divides every row's GB/s and TFLOP/s by these."""
import torch

from bench.harness import DEVICE, ON_GPU, Work, measure
from bench.report import PEAK_GROUP

COPY_BYTES = 2**30 if ON_GPU else 2**26
MATMUL_N = 8192 if ON_GPU else 2048


def test_copy_bandwidth(benchmark):
    src = torch.randn(COPY_BYTES // 4, device=DEVICE)
    dst = torch.empty_like(src)
    measure(benchmark, lambda: dst.copy_(src), [()], Work(bytes=2 * COPY_BYTES, flops=0, images=0),
            group=PEAK_GROUP, op="copy", provider="torch", dtype=torch.float32, batch=1, size=0, mode="device copy")


def test_matmul_peak(benchmark, dtype):
    a, b = (torch.randn(MATMUL_N, MATMUL_N, device=DEVICE, dtype=dtype) for _ in range(2))
    work = Work(bytes=3 * a.numel() * a.element_size(), flops=2 * MATMUL_N**3, images=0)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        measure(benchmark, lambda: a @ b, [()], work, group=PEAK_GROUP, op="matmul", provider="torch", dtype=dtype,
                batch=1, size=MATMUL_N, mode="tf32" if dtype == torch.float32 else "tensor cores")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
