"""topk_pool with the paper's rank-based dropout (training, where LFM uses it on its own), on LFM's
(B, 64, 30, 30) score maps at 256x256; the authors' way is torch.topk then the dropout in eager ops."""
import pytest
import torch

from bench.authors import authors_rank_dropout, authors_topk
from bench.harness import DEVICE, MODES, OP_BATCH, bench_op
from bench.shapes import SCORE_CHANNELS, SCORE_GRID, K
from lfm_kernels import topk_pool

DROP = (0.1, 0.3)


@pytest.mark.parametrize("mode", MODES)
def test_topk_pool(benchmark, provider, dtype, mode):
    bench_op(benchmark, op="topk_pool", provider=provider, dtype=dtype, mode=mode,
             eager=lambda x: authors_rank_dropout(authors_topk(x, K), *DROP),
             fused=lambda x, backend: topk_pool(x, K, drop=DROP, training=True, backend=backend),
             make_inputs=lambda: (torch.randn(OP_BATCH, SCORE_CHANNELS, *SCORE_GRID, device=DEVICE, dtype=dtype),))
