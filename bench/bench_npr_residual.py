"""npr_residual: abs(NPR) of a batch of 256x256 images; the authors' way is two frozen convs, a sub and an abs."""
import pytest
import torch

from bench.authors import authors_residual, frozen_npr_convs
from bench.harness import DEVICE, MODES, OP_BATCH, bench_op
from bench.shapes import IMAGE_SIZE
from lfm_kernels import npr_residual


@pytest.mark.parametrize("mode", MODES)
def test_npr_residual(benchmark, provider, dtype, mode):
    down, up = (conv.to(DEVICE, dtype) for conv in frozen_npr_convs())
    bench_op(benchmark, op="npr_residual", provider=provider, dtype=dtype, mode=mode,
             eager=lambda x: authors_residual(x, down, up),
             fused=lambda x, backend: npr_residual(x, 2, absolute=True, backend=backend),
             make_inputs=lambda: (torch.randn(OP_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, device=DEVICE, dtype=dtype),),
             params=[down.weight, up.weight])
