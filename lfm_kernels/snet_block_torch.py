"""The torch backend of snet_block: what it runs on CPU (the references' answers and gradients, faster).

Inference (nothing trained, no gradient needed; on a GPU, the cuDNN composition that backend="auto" takes
where a GPU run measured it faster than our kernels):
  - BatchNorm folded into the conv weight and bias on every call (once under frozen.frozen_weights, for
    a CUDA graph). Nothing is cached otherwise, so no update of the parameters (an optimizer step, a
    `.data` write) can leave a stale copy; folding costs under 1% of a block.
  - channels_last activations and folded weights, which oneDNN convolves about twice as fast as NCHW.
  - pool blocks by cache-sized chunks (CHUNK_BYTES of conv output: a few images, or a band of rows of
    one): the pre-pool map is pooled while it is in cache instead of going to memory and back, which
    alone doubles the speed at batch 8 on 2 cores. Under torch.compile and torch.export the whole
    batch goes in one call (one graph for any batch size), pooled by F.max_pool2d in an export.
  - max-pool without indices (F.max_pool2d computes them even when nothing needs them), before an
    in-place ReLU. oneDNN's fused conv+ReLU is not used: its ReLU turns NaN into 0, and our ops keep
    NaN (a broken checkpoint must score NaN, not a number).
Training (batch statistics, gradients):
  - A pool block is one autograd function that works by chunks of images (twice CHUNK_BYTES of conv
    output: its forward map and its gradient share the cache). Eager PyTorch writes the conv output, the
    normalized map and the ReLU map, each as large as the conv output (102 MB per map for LFM's block 1
    at batch 8, 224x224), and reads each back in the forward and again in the backward. Here the conv
    output is the only full map kept: the statistics of each chunk are taken while it is in cache (and
    combined exactly), normalization, pooling and ReLU run chunk by chunk, keeping the pooled output, the
    pool indices and the conv output at each pick; the backward takes BatchNorm's sums from the picks
    alone, then rebuilds each chunk's input gradient and runs the conv backward on it while it is in cache.
  - Pool before ReLU: they commute, and the gradient reaches the same element (the window's first
    maximum, as F.max_pool2d picks it, when it is positive; nothing otherwise).
The references run instead under torch.compile and torch.export, under autocast, for dtypes other than
float32 and float64 or mixed ones, off CPU and for an empty batch (fast_training says which), and for
blocks in eval mode with gradients (running statistics).
"""
import torch
import torch.nn.functional as F

from .frozen import preprocessed
from .npr_residual import npr_residual_inference


def fold_batchnorm(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps):
    """(weight, bias) with conv(x, weight, bias) == batchnorm(conv(x, conv_weight, conv_bias)) in eval."""
    scale = bn_weight / torch.sqrt(running_var + eps)
    bias = bn_bias - running_mean * scale
    if conv_bias is not None:
        bias = bias + conv_bias * scale
    # In channels_last, the layout oneDNN takes with channels_last activations (else each conv call, one
    # per chunk, would copy the weight into it).
    return (conv_weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last), bias


# Bytes of pre-pool map one conv call writes before the pool reads it back. Kept small enough to stay
# in cache: a whole block-1 map at batch 8 and 256x256 is 133 MB, which the conv writes to memory and
# the pool reads back, so pool blocks run a few images, or a band of rows of one image, at a time.
CHUNK_BYTES = 4 << 20  # training chunks hold twice this (forward map and gradient; measured 1.5x faster
# than 64 MB per chunk on 2 cores)


def snet_block_inference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, *, eps=1e-5,
                         pool=True, npr=False):
    """snet_block_reference(..., training=False) with BatchNorm folded, in channels_last, pooled by
    cache-sized chunks of images or rows."""
    if npr:
        x = npr_residual_inference(x)
    weight, bias = preprocessed(fold_batchnorm, conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
                                running_var, eps)
    x = x.contiguous(memory_format=torch.channels_last)
    if not pool:
        return F.conv2d(x, weight, bias).relu_()
    if torch.compiler.is_exporting():
        # One graph for any batch; F.max_pool2d becomes ONNX's MaxPool, which ONNX Runtime runs in its
        # blocked layout next to the convs (four strided slices there cost more than all the convs).
        return F.max_pool2d(F.conv2d(x, weight, bias), 2).relu_()
    if torch.compiler.is_compiling() or not x.shape[0] or x.device.type != "cpu":
        # One graph for any batch (Inductor fuses the pool); a GPU wants whole batches (cuDNN in channels_last).
        # Chunks sized for a CPU's cache are for CPUs only.
        return max_pool_2x2(F.conv2d(x, weight, bias)).relu_()
    # Pool first: max-pool and ReLU commute (both monotonic, both keep NaN), so ReLU touches a quarter.
    B, _, H, W = x.shape
    Hp = (H - 1) // 2
    row_bytes = 2 * (W - 1) * weight.shape[0] * x.element_size()  # conv output behind one pooled row
    images = max(1, CHUNK_BYTES // (row_bytes * Hp))
    rows = Hp if images > 1 else max(1, CHUNK_BYTES // row_bytes)
    out = None
    for i in range(0, B, images):
        for r in range(0, Hp, rows):
            r_end = min(r + rows, Hp)
            # Conv rows [2r, 2 r_end) read input rows [2r, 2 r_end + 1): a slice of one image, or whole
            # images, is still a dense channels_last tensor, so oneDNN reads it in place.
            y = F.conv2d(x[i:i + images, :, 2 * r:2 * r_end + 1], weight, bias)
            if out is None:  # the conv's dtype (autocast may change it)
                out = torch.empty((B, y.shape[1], Hp, (W - 1) // 2), dtype=y.dtype, device=y.device,
                                  memory_format=torch.channels_last)
            max_pool_2x2(y, out=out[i:i + images, :, r:r_end]).relu_()
    return out


def max_pool_2x2(y, out=None):
    """F.max_pool2d(y, 2) (floor mode, NaN kept) as the maximum of the four strided phases of the
    windows: no indices, and in channels_last each phase reads whole channel vectors."""
    h, w = y.shape[-2] // 2 * 2, y.shape[-1] // 2 * 2
    top = torch.maximum(y[..., 0:h:2, 0:w:2], y[..., 0:h:2, 1:w:2])
    bottom = torch.maximum(y[..., 1:h:2, 0:w:2], y[..., 1:h:2, 1:w:2])
    return torch.maximum(top, bottom) if out is None else torch.maximum(top, bottom, out=out)


def bessel_correction(n: int) -> float:
    """n / (n - 1): a biased variance over n values times this is the unbiased one (1 for n <= 1)."""
    return n / max(n - 1, 1)


def running_stats_targets(mean, var, n, dtype):
    """(2, C) in the running statistics' dtype: the batch mean and the unbiased variance over n values, which
    nn.BatchNorm2d moves its running statistics towards."""
    return torch.stack((mean, var * bessel_correction(n))).to(dtype)


def update_running_stats(running_mean, running_var, targets, n, momentum):
    """nn.BatchNorm2d's update: running + momentum * (target - running) for both statistics in one op (on a
    GPU every op is a launch), towards running_stats_targets; an empty batch leaves them alone."""
    if running_mean is None or n == 0:
        return
    with torch.no_grad():
        torch._foreach_lerp_((running_mean, running_var), targets.unbind(), momentum)


def fast_training(x, *tensors) -> bool:
    """Whether the training path takes these inputs (else the reference runs)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.shape[0] > 0
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and all(t is None or t.dtype == x.dtype for t in tensors))


def _channels_last_rows(t):
    """A channels_last (n, C, H, W) tensor as its (n, H*W, C) view."""
    return t.permute(0, 2, 3, 1).flatten(1, 2)


class _PoolBlock(torch.autograd.Function):
    """maxpool2x2(relu(batchnorm(conv2d(x, weight, bias)))) with batch statistics; returns the output, the
    batch mean and the biased batch variance (for the running statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, eps):
        x = x.contiguous(memory_format=torch.channels_last)
        n = max(1, 2 * CHUNK_BYTES // ((x.shape[2] - 1) * (x.shape[3] - 1) * weight.shape[0] * x.element_size()))
        ys, stats = [], []
        for part in x.split(n):
            ys.append(F.conv2d(part, weight, bias))
            # Statistics while the chunk is in cache, in two passes (torch.var_mean is 5x slower here).
            rows = _channels_last_rows(ys[-1]).flatten(0, 1)
            chunk_mean = rows.mean(0)
            stats.append(((rows - chunk_mean).square_().mean(0), chunk_mean))
        # Chunk statistics combined exactly: var = sum over chunks of share * (var_i + (mean_i - mean)^2).
        var_i, mean_i = (torch.stack(s) for s in zip(*stats))
        share = torch.tensor([y.shape[0] / x.shape[0] for y in ys], dtype=x.dtype).unsqueeze(1)
        mean = (share * mean_i).sum(0)
        var = (share * (var_i + (mean_i - mean) ** 2)).sum(0)
        rstd = torch.rsqrt(var + eps)
        scale, shift = (gamma * rstd).view(-1, 1, 1), (beta - mean * gamma * rstd).view(-1, 1, 1)
        out = torch.empty((x.shape[0], weight.shape[0], ys[0].shape[2] // 2, ys[0].shape[3] // 2), dtype=x.dtype,
                          memory_format=torch.channels_last)
        idxs, y_ats = [], []
        for i, y in zip(range(0, x.shape[0], n), ys):
            pooled, idx = F.max_pool2d(torch.addcmul(shift, y, scale), 2, return_indices=True)
            torch.clamp_min(pooled, 0, out=out[i:i + n])
            idxs.append(idx)
            y_ats.append(_channels_last_rows(y).gather(1, _channels_last_rows(idx)))  # for BatchNorm's gradient
        ctx.save_for_backward(x, weight, gamma, mean, rstd, out, *ys, *idxs, *y_ats)
        ctx.has_bias, ctx.n = bias is not None, n
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var):
        x, weight, gamma, mean, rstd, out, *chunks = ctx.saved_tensors
        k = len(chunks) // 3
        ys, idxs, y_ats = chunks[:k], chunks[k:2 * k], chunks[2 * k:]
        n = ctx.n
        # ReLU's gradient; BatchNorm's sums need only the positions the pool picked.
        g = (grad * (out > 0)).contiguous(memory_format=torch.channels_last)
        g_rows = _channels_last_rows(g)
        count = x.shape[0] * ys[0].shape[2] * ys[0].shape[3]
        d_beta = g_rows.sum((0, 1))
        starts = range(0, x.shape[0], n)
        d_gamma = sum((g_rows[i:i + n] * (y_at - mean)).sum((0, 1)) for i, y_at in zip(starts, y_ats)) * rstd
        # dy = gamma rstd (dz - mean(dz) - yhat mean(dz yhat)) = a dz + b y + c, per channel.
        a = gamma * rstd
        b = -a * rstd * d_gamma / count
        c = -a * d_beta / count - b * mean
        a, b, c = a.view(-1, 1, 1), b.view(-1, 1, 1), c.view(-1, 1, 1)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        dx, dw, db = [], None, None
        for i, y, idx in zip(starts, ys, idxs):
            dz = torch.ops.aten.max_pool2d_with_indices_backward(g[i:i + n], y, [2, 2], [2, 2], [0, 0], [1, 1],
                                                                  False, idx)
            dy = torch.addcmul(torch.addcmul(c, y, b), dz, a)
            # The conv's backward on this chunk while its dy is in cache; weight and bias gradients add up.
            part = torch.ops.aten.convolution_backward(dy, x[i:i + n], weight, [weight.shape[0]], [1, 1], [0, 0],
                                                       [1, 1], False, [0, 0], 1, mask)
            dx.append(part[0])
            if mask[1]:
                dw = part[1] if dw is None else dw.add_(part[1])
            if mask[2]:
                db = part[2] if db is None else db.add_(part[2])
        return torch.cat(dx) if mask[0] else None, dw, db, d_gamma, d_beta, None


def snet_block_train(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, *, eps=1e-5,
                     momentum=0.1, pool=True, npr=False):
    """snet_block_reference(..., training=True): batch statistics, running statistics (when given) updated
    in place as nn.BatchNorm2d does (momentum, unbiased variance)."""
    if npr:
        x = npr_residual_inference(x)
    if not pool:  # block 4: its map fits in cache; plain ops in channels_last
        y = F.conv2d(x.contiguous(memory_format=torch.channels_last), conv_weight, conv_bias)
        return F.relu(F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps))
    out, mean, var = _PoolBlock.apply(x, conv_weight, conv_bias, bn_weight, bn_bias, eps)
    if running_mean is not None:
        n = x.shape[0] * (x.shape[2] - 1) * (x.shape[3] - 1)
        update_running_stats(running_mean, running_var, running_stats_targets(mean, var, n, running_mean.dtype), n,
                             momentum)
    return out
