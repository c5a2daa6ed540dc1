"""random_k_pool (random-K sampling) on LFM's (B, 64, 30, 30) score maps at 256x256. Its forward needs only
the k sampled values of each map (read, then written): too little traffic for a bandwidth figure, so the
report marks it latency-bound; its backward writes the whole (zero-filled) input gradient."""
import pytest
import torch

from bench.authors import authors_random_k
from bench.harness import DEVICE, MODES, OP_BATCH, bench_op, total_bytes
from bench.shapes import SCORE_CHANNELS, SCORE_GRID, K
from lfm_kernels import random_k_pool


@pytest.mark.parametrize("mode", MODES)
def test_random_k_pool(benchmark, provider, dtype, mode):
    bench_op(benchmark, op="random_k_pool", provider=provider, dtype=dtype, mode=mode,
             eager=lambda x: authors_random_k(x, K),
             fused=lambda x, backend: random_k_pool(x, K, backend=backend),
             make_inputs=lambda: (torch.randn(OP_BATCH, SCORE_CHANNELS, *SCORE_GRID, device=DEVICE, dtype=dtype),),
             forward_bytes=lambda inputs, out: 2 * total_bytes([out]))
