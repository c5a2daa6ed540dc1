"""Every Triton launch of LFM at its shapes, from a real forward and backward of the model: the one list of
workloads that the launch sweep (bench.tune, on a GPU) and the compile report (bench.compile_report, launches
stubbed out on CPU) record through lfm_kernels.configs.observe_launches.

LFM's inference at 256x256, a training step of each kind (rank dropout with the random-K auxiliary loss, and
the fused scoring + Top-K without it), and the standalone ops' forward and backward that the model does not
call (NPR residual, Top-K pooling and random-K pooling on their own, up to the kernels' largest k).
"""
import contextlib
import os

import torch
import torch.nn.functional as F

from bench.shapes import IMAGE_SIZE, LARGE_BATCH, SCORE_CHANNELS, SCORE_GRID, TRAIN_BATCH, TRAIN_SIZE, K

EVAL_BATCHES = (1, 8, 32, LARGE_BATCH)  # lfm predict on one photo, small batches that split work, full GPUs


def lfm_model(dtype, device, precision=None, training=False):
    """LFM on the triton backend as trained (paper dropout, random-K weight), in `dtype` on `device`."""
    from lfm import LFM

    model = LFM(backend="triton", dropout="paper", random_k_weight=0.02, input_precision=precision)
    return model.to(device=device, dtype=dtype).train(training)


def inference(model, batch, size=IMAGE_SIZE):
    """One eval forward at `batch` x 3 x size x size (the input's values never steer the model's code)."""
    parameter = next(model.parameters())
    with torch.no_grad():
        return model.eval()(torch.empty(batch, 3, size, size, dtype=parameter.dtype, device=parameter.device))


def training_step(model, batch=TRAIN_BATCH, size=TRAIN_SIZE, aux=True, images=None, keep_grads=False):
    """Forward and backward of one training step (with the random-K auxiliary logits when `aux`) on `images`
    (default: uninitialized, batch x 3 x size x size); the gradients are dropped unless `keep_grads`."""
    parameter = next(model.parameters())
    if images is None:
        images = torch.empty(batch, 3, size, size, dtype=parameter.dtype, device=parameter.device)
    model.train()
    target = torch.zeros(images.shape[0], 1, dtype=parameter.dtype, device=parameter.device)
    if aux:
        logits, aux_logits = model(images, return_aux=True)
        loss = F.binary_cross_entropy_with_logits(logits, target) + F.binary_cross_entropy_with_logits(aux_logits,
                                                                                                        target)
    else:
        loss = F.binary_cross_entropy_with_logits(model(images), target)
    loss.backward()
    if not keep_grads:
        model.zero_grad(set_to_none=True)


def standalone_ops(dtype, device, batch):
    """Forward and backward of the ops LFM fuses away or calls only in part: the NPR residual, Top-K pooling
    (with and without dropout), random-K pooling, and both selections at the kernels' largest k."""
    from lfm_kernels import npr_residual, random_k_pool, topk_pool
    from lfm_kernels.checks import MAX_KERNEL_K

    options = dict(dtype=dtype, device=device, requires_grad=True)
    image = torch.empty(batch, 3, IMAGE_SIZE, IMAGE_SIZE, **options)
    npr_residual(image, backend="triton").sum().backward()
    scores = torch.empty(batch, SCORE_CHANNELS, *SCORE_GRID, **options)
    wide = torch.empty(1, 2, IMAGE_SIZE, IMAGE_SIZE, **options)
    for x, k in ((scores, K), (wide, MAX_KERNEL_K)):
        topk_pool(x, k, backend="triton").sum().backward()
        topk_pool(x, k, drop=(0.1, 0.3), training=True, backend="triton").sum().backward()
        random_k_pool(x, k, backend="triton").sum().backward()


def lfm_workloads(dtype, device, precision=None, eval_batches=(1, LARGE_BATCH), train_batch=TRAIN_BATCH,
                  op_batch=LARGE_BATCH):
    """Every launch of LFM in `dtype` (float32 in `precision`, None: torch's TF32 switch) on `device`."""
    model = lfm_model(dtype, device, precision)
    for batch in eval_batches:
        inference(model, batch)
    for aux in (True, False):
        training_step(model, train_batch, aux=aux)
    standalone_ops(dtype, device, op_batch)


@contextlib.contextmanager
def cpu_tensors_take_the_triton_path():
    """backend="triton" accepts CPU tensors only under TRITON_INTERPRET=1 (read at call time): for runs whose
    launches are stubbed out or faked. Kernels stay what they were when triton was imported. The variable is
    restored afterwards."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
