"""SNet blocks at LFM's 256x256 input: [abs-NPR residual (block 1) ->] 2x2 conv -> BatchNorm -> ReLU
[-> 2x2 max-pool (blocks 1-3)], and the head (block 4 + 1x1 scoring + Top-K). Eager is the authors'
nn.Sequential block and F.max_pool2d; ours is lfm_kernels.snet_block / snet_head (issue 4). Forward
in eval mode (running statistics), forward+backward in training mode (batch statistics); the image
needs no gradient, as in training."""
import pytest
import torch
import torch.nn.functional as F

import lfm_kernels
from bench.authors import (authors_rank_dropout, authors_residual, authors_snet_block, authors_topk, frozen_npr_convs,
                           snet_layer)
from bench.harness import DEVICE, FORWARD_BACKWARD, MODES, OP_BATCH, bench_op
from bench.providers import LFM_BACKENDS

# block: (input channels, output channels, input side at a 256x256 image)
BLOCKS = {1: (3, 64, 256), 2: (64, 128, 127), 3: (128, 256, 63), 4: (256, 512, 31)}
K, DROP = 16, (0.1, 0.1)  # as LFM trains with the released dropout


def fused_op(name: str, provider: str):
    """lfm_kernels.<name>, or a skip when our providers need it and it is not there yet."""
    op = getattr(lfm_kernels, name, None)
    if op is None and provider in LFM_BACKENDS:
        pytest.skip(f"lfm_kernels.{name} is not there yet (the fused SNet of issue 4)")
    return op


def block_case(block: int, dtype, training: bool):
    """The block's layer (Conv2d, BatchNorm2d, ReLU), its op arguments and its rotating input maker."""
    cin, cout, side = BLOCKS[block]
    layer = snet_layer(cin, cout).to(DEVICE, dtype).train(training)
    conv, bn = layer[0], layer[1]
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    options = dict(eps=bn.eps, momentum=bn.momentum, training=training)
    make_inputs = lambda: (torch.randn(OP_BATCH, cin, side, side, device=DEVICE, dtype=dtype).abs(),)  # noqa: E731
    return layer, tensors, options, make_inputs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_snet_block(benchmark, provider, dtype, mode, block):
    snet_block = fused_op("snet_block", provider)
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
    snet_head = fused_op("snet_head", provider)
    training = mode == FORWARD_BACKWARD
    layer, tensors, options, make_inputs = block_case(4, dtype, training)
    score_weight = (torch.randn(64, 512, 1, 1, device=DEVICE) / 512**0.5).to(dtype).requires_grad_(training)
    drop = DROP if training else None

    def eager(x):
        top = authors_topk(F.conv2d(authors_snet_block(x, layer, pool=False), score_weight), K)
        return authors_rank_dropout(top, *drop) if training else top

    bench_op(benchmark, op="snet_head", provider=provider, dtype=dtype, mode=mode, eager=eager,
             fused=lambda x, backend: snet_head(x, *tensors, score_weight, K, **options, drop=drop, backend=backend),
             make_inputs=make_inputs, params=[*tensors, score_weight])
