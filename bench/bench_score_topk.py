"""score_topk: the 1x1 scoring conv 512 -> 64 and Top-K on LFM's (B, 512, 30, 30) block-4 features at
256x256; forward as in inference, forward+backward as in training (with the paper's rank dropout)."""
import pytest
import torch
import torch.nn.functional as F

from bench.authors import authors_rank_dropout, authors_topk
from bench.harness import DEVICE, FORWARD_BACKWARD, MODES, OP_BATCH, bench_op
from bench.shapes import FEATURE_CHANNELS, SCORE_CHANNELS, SCORE_GRID, K
from lfm_kernels import score_topk

DROP = (0.1, 0.3)


@pytest.mark.parametrize("mode", MODES)
def test_score_topk(benchmark, provider, dtype, mode):
    training = mode == FORWARD_BACKWARD
    weight = torch.randn(SCORE_CHANNELS, FEATURE_CHANNELS, 1, 1, device=DEVICE) / FEATURE_CHANNELS**0.5
    weight = weight.to(dtype).requires_grad_(training)

    def eager(feat):
        top = authors_topk(F.conv2d(feat, weight), K)
        return authors_rank_dropout(top, *DROP) if training else top

    def features():  # block 4's output: after a ReLU
        return (torch.randn(OP_BATCH, FEATURE_CHANNELS, *SCORE_GRID, device=DEVICE, dtype=dtype).relu(),)

    bench_op(benchmark, op="score_topk", provider=provider, dtype=dtype, mode=mode, eager=eager,
             fused=lambda feat, backend: score_topk(feat, weight, K, drop=DROP, training=training, backend=backend),
             make_inputs=features, params=[weight])
