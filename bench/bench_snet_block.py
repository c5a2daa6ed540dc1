"""SNet blocks at LFM's 256x256 input: [abs-NPR residual (block 1) ->] 2x2 conv -> BatchNorm -> ReLU
[-> 2x2 max-pool (blocks 1-3)], and the head (block 4 + 1x1 scoring + Top-K). Eager is the authors'
nn.Sequential block and F.max_pool2d; ours is lfm_kernels.snet_block / snet_head. Forward
in eval mode (running statistics), forward+backward in training mode (batch statistics); the image
needs no gradient, as in training."""
import pytest
import torch
import torch.nn.functional as F

from bench.authors import (
    authors_rank_dropout,
    authors_residual,
    authors_snet_block,
    authors_topk,
    frozen_npr_convs,
    snet_layer,
)
from bench.harness import DEVICE, FORWARD_BACKWARD, MODES, OP_BATCH, bench_op
from bench.shapes import FEATURE_CHANNELS, SCORE_CHANNELS, SNET_BLOCKS, K
from lfm_kernels import snet_block, snet_head

DROP = (0.1, 0.1)  # as LFM trains with the released dropout


def block_case(block: int, dtype, training: bool):
    """The block's layer (Conv2d, BatchNorm2d, ReLU), its op arguments and its rotating input maker."""
    cin, cout, side = SNET_BLOCKS[block]
    layer = snet_layer(cin, cout).to(DEVICE, dtype).train(training)
    conv, bn = layer[0], layer[1]
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    options = dict(eps=bn.eps, momentum=bn.momentum, training=training)
    make_inputs = lambda: (torch.randn(OP_BATCH, cin, side, side, device=DEVICE, dtype=dtype).abs(),)  # noqa: E731
    return layer, tensors, options, make_inputs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block", sorted(SNET_BLOCKS))
def test_snet_block(benchmark, provider, dtype, mode, block):
    layer, tensors, options, make_inputs = block_case(block, dtype, mode == FORWARD_BACKWARD)
    pool, npr = block < 4, block == 1
    down, up = (conv.to(DEVICE, dtype) for conv in frozen_npr_convs())

    def eager(x):
        return authors_snet_block(authors_residual(x, down, up) if npr else x, layer, pool)

    bench_op(benchmark, op=f"snet_block{block}", provider=provider, dtype=dtype, mode=mode, eager=eager,
             fused=lambda x, backend: snet_block(x, *tensors, **options, pool=pool, npr=npr, backend=backend),
             make_inputs=make_inputs, params=[*tensors, *((down.weight, up.weight) if npr else ())],
             input_grad=not npr)


@pytest.mark.parametrize("mode", MODES)
def test_snet_head(benchmark, provider, dtype, mode):
    training = mode == FORWARD_BACKWARD
    layer, tensors, options, make_inputs = block_case(4, dtype, training)
    score_weight = torch.randn(SCORE_CHANNELS, FEATURE_CHANNELS, 1, 1, device=DEVICE) / FEATURE_CHANNELS**0.5
    score_weight = score_weight.to(dtype).requires_grad_(training)
    drop = DROP if training else None

    def eager(x):
        top = authors_topk(F.conv2d(authors_snet_block(x, layer, pool=False), score_weight), K)
        return authors_rank_dropout(top, *drop) if training else top

    bench_op(benchmark, op="snet_head", provider=provider, dtype=dtype, mode=mode, eager=eager,
             fused=lambda x, backend: snet_head(x, *tensors, score_weight, K, **options, drop=drop, backend=backend),
             make_inputs=make_inputs, params=[*tensors, score_weight])
