"""The triton kernels and the eager composition (cuDNN on a GPU), each against the same computation in
float64: ours may be at most twice as far from it as the eager composition, plus a small floor.

On a CUDA GPU (marked gpu, skipped without one) at LFM's sizes (256x256 images, batch 64), float32 with
TF32 off and on (the eager side under the same cuDNN switch) and bfloat16. On CPU under the Triton
interpreter the same checks run at small sizes in float32, so `make test` exercises the method.

The smoke tier of the GPU run (bench/gpu_suite.py, first) runs the GPU cases with `pytest -m gpu`; kernel
checks come first, torch.compile last, since the tier stops at its time cap.
"""
import contextlib

import pytest
import torch
from utils import (
    BRANCH_FLIP_FLOOR,
    assert_as_accurate,
    assert_training_step_as_accurate,
    authors_outputs,
    block_params,
    training_step,
)

from bench.authors import AuthorsLFM
from bench.providers import CHECKPOINT, authors_files
from lfm import LFM
from lfm_kernels import (
    npr_residual,
    npr_residual_reference,
    random_k_pool,
    score_topk,
    score_topk_reference,
    snet_block,
    snet_block_reference,
    snet_head,
    snet_head_reference,
    topk_pool,
    topk_pool_reference,
)

K, DROP = 16, (0.1, 0.3)
# precision -> (dtype of the inputs, our kernels' input_precision, cuDNN's TF32 switch)
PRECISIONS = {"float32": (torch.float32, "ieee", False), "tf32": (torch.float32, "tf32", True),
              "bfloat16": (torch.bfloat16, None, False)}
CASES = pytest.mark.parametrize("device,precision", [
    pytest.param("cpu", "float32", id="cpu-float32"),
    *(pytest.param("cuda", p, marks=pytest.mark.gpu, id=f"cuda-{p}") for p in PRECISIONS),
])
gpu = pytest.mark.gpu


def eager_as_deployed(device, precision):
    """cuDNN on (flags() without enabled=True turns it off), its default algorithms, TF32 as `precision` says."""
    if device != "cuda":
        return contextlib.nullcontext()
    return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False,
                                      allow_tf32=PRECISIONS[precision][2])


def gradient_floor(device):
    """At full size both sides flip many near-ties and their errors average out: the rounding floor. At the
    CPU's small sizes one flip is all or nothing."""
    return BRANCH_FLIP_FLOOR if device == "cpu" else None


def forward_backward(fn, inputs, seed=1):
    """fn(*inputs) and the gradients of <out, fixed random weights> with respect to the floating inputs. The
    weights are bfloat16 numbers, the same at every precision."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    out.backward(weights.to(out.device, out.dtype))
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


def check_op(op, reference, inputs, names, device, precision, norm=True):
    """Ours (backend triton, input_precision as `precision` says), the eager reference on the same inputs and
    the reference in float64 on them: forward and the gradient of each input named in `names`."""
    dtype, input_precision, _ = PRECISIONS[precision]
    inputs = [t.to(dtype) for t in inputs]
    with eager_as_deployed(device, precision):
        ours = forward_backward(lambda *x: op(*x, input_precision=input_precision, backend="triton"), inputs)
        eager = forward_backward(reference, inputs)
    truth = forward_backward(reference, [t.double() for t in inputs])
    assert ours[0].dtype == dtype
    assert_as_accurate(ours[0], eager[0], truth[0], "forward", norm=norm)
    for name, a, b, c in zip(names, ours[1], eager[1], truth[1], strict=True):
        assert_as_accurate(a, b, c, f"gradient of {name}", norm=norm, floor=gradient_floor(device))


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


@CASES
def test_npr_residual(device, precision):
    shape = (64, 3, 256, 256) if device == "cuda" else (2, 3, 9, 11)
    image = torch.randn(shape, generator=_generator()).to(device)
    check_op(lambda x, input_precision, backend: npr_residual(x, backend=backend), npr_residual_reference, [image],
             ["the image"], device, precision, norm=False)


@CASES
def test_topk_pool(device, precision):
    shape = (64, 64, 30, 30) if device == "cuda" else (2, 4, 7, 9)
    scores = torch.randn(shape, generator=_generator()).to(device)
    check_op(lambda x, input_precision, backend: topk_pool(x, K, backend=backend),
             lambda x: topk_pool_reference(x, K), [scores], ["the scores"], device, precision)


@CASES
def test_topk_pool_rank_dropout(device, precision):
    """The indices exactly those of torch.topk; the kept values and the gradient, each against float64: the
    selected value times 1 / (1 - mean p), one rounding of the result's dtype away."""
    dtype = PRECISIONS[precision][0]
    shape = (64, 64, 30, 30) if device == "cuda" else (4, 16, 7, 9)
    scores = torch.randn(shape, generator=_generator()).to(device, dtype).requires_grad_()
    values, idx = topk_pool(scores, K, drop=DROP, training=True, return_indices=True, backend="triton")
    expected, expected_idx = topk_pool_reference(scores.detach(), K, return_indices=True)
    assert torch.equal(idx, expected_idx)
    kept = values != 0
    scale = 1 / (1 - sum(DROP) / 2)
    one_rounding = torch.finfo(dtype).eps
    assert_as_accurate(values[kept], None, expected[kept].double() * scale, "kept values", floor=one_rounding)
    n = values.numel()  # dropped with probability mean p = 0.2: within 5 sigma
    assert abs((~kept).sum().item() - n * sum(DROP) / 2) < 5 * (n * 0.2 * 0.8) ** 0.5
    values.backward(torch.ones_like(values))  # the gradient flows through the kept values only, scaled
    truth = torch.zeros_like(scores, dtype=torch.float64).flatten(2).scatter(-1, idx, kept.double() * scale)
    assert_as_accurate(scores.grad.flatten(2), None, truth, "gradient of the scores", floor=one_rounding)


@CASES
def test_random_k_pool(device, precision):
    dtype = PRECISIONS[precision][0]
    shape = (64, 64, 30, 30) if device == "cuda" else (2, 4, 7, 9)
    scores = torch.randn(shape, generator=_generator()).to(device, dtype).requires_grad_()
    values, idx = random_k_pool(scores, K, return_indices=True, backend="triton")
    flat = scores.detach().flatten(2)
    assert torch.equal(values, flat.gather(-1, idx)) and bool((values[..., 1:] >= values[..., :-1]).all())
    assert bool((idx.sort(dim=-1).values.diff(dim=-1) > 0).all())  # k distinct positions
    values.backward(torch.ones_like(values))
    assert torch.equal(scores.grad.flatten(2), torch.zeros_like(flat).scatter(-1, idx, 1.0))


@CASES
def test_score_topk(device, precision):
    (B, C, H, W), cout = ((64, 512, 30, 30), 64) if device == "cuda" else ((2, 32, 6, 7), 8)
    feat = torch.randn(B, C, H, W, generator=_generator()).relu().to(device)
    weight = (torch.randn(cout, C, 1, 1, generator=_generator(1)) / C**0.5).to(device)
    # The scoring GEMM, the Top-K merge and both gradients (rank dropout shares topk_pool's code).
    check_op(lambda f, w, input_precision, backend: score_topk(f, w, K, input_precision=input_precision,
                                                               backend=backend),
             lambda f, w: score_topk_reference(f, w, K), [feat, weight], ["the features", "the scoring weight"],
             device, precision)


@CASES
def test_snet_head(device, precision):
    """Inference: one kernel for block 4, scoring and Top-K candidates."""
    (B, cin, size), cout, scores = ((64, 256, 31), 512, 64) if device == "cuda" else ((2, 16, 7), 32, 8)
    x = torch.randn(B, cin, size, size, generator=_generator()).abs().to(device)
    block4 = [p.to(device) for p in block_params(cin, cout)]
    score_weight = (torch.randn(scores, cout, 1, 1, generator=_generator(1)) / cout**0.5).to(device)
    dtype, input_precision, _ = PRECISIONS[precision]
    inputs = [t.to(dtype) for t in (x, *block4, score_weight)]
    with torch.no_grad():
        with eager_as_deployed(device, precision):
            ours = snet_head(*inputs, K, input_precision=input_precision, backend="triton")
            eager = snet_head_reference(*inputs, K)
        truth = snet_head_reference(*[t.double() for t in inputs], K)
    assert_as_accurate(ours, eager, truth, "forward (Top-K values)", norm=True)


BLOCKS = {"cuda": [(3, 64, 256, True, True), (64, 128, 127, False, True), (128, 256, 63, False, True),
                   (256, 512, 31, False, False)],
          "cpu": [(3, 8, 12, True, True), (8, 16, 11, False, True), (16, 16, 9, False, True),
                  (16, 32, 7, False, False)]}
BLOCK_INPUTS = ("the input", "the conv weight", "the conv bias", "the bn weight", "the bn bias")


def _block_run(fn, inputs, stats, training, pool, npr, autocast):
    """Output and gradients of (x, conv weight, conv bias, bn weight, bn bias); `stats` updated in place."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        return forward_backward(lambda *t: fn(*t, *stats, training=training, pool=pool, npr=npr), inputs)


@CASES
@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
@pytest.mark.parametrize("block", [1, 2, 3, 4], ids=["block1", "block2", "block3", "block4"])
def test_snet_block(device, precision, training, block):
    """Forward, every gradient and (training) the running statistics. bfloat16 under autocast, as a model
    trains in it: float32 parameters and statistics."""
    cin, cout, size, npr, pool = BLOCKS[device][block - 1]
    B = 64 if device == "cuda" else 2
    x = torch.randn(B, cin, size, size, generator=_generator()).to(device)
    params = [p.to(device) for p in block_params(cin, cout)]
    _, input_precision, _ = PRECISIONS[precision]
    autocast = precision == "bfloat16"
    stats = {name: [p.clone() for p in params[4:]] for name in ("ours", "eager", "truth")}

    def ours_fn(*t, **kw):
        return snet_block(*t, input_precision=input_precision, backend="triton", **kw)

    with eager_as_deployed(device, precision):
        ours = _block_run(ours_fn, [x, *params[:4]], stats["ours"], training, pool, npr, autocast)
        eager = _block_run(snet_block_reference, [x, *params[:4]], stats["eager"], training, pool, npr, autocast)
    stats["truth"] = [p.double() for p in stats["truth"]]
    truth = _block_run(snet_block_reference, [x.double(), *[p.double() for p in params[:4]]], stats["truth"],
                       training, pool, npr, False)
    assert_as_accurate(ours[0], eager[0], truth[0], "forward", norm=True)
    for i, (name, a, b, c) in enumerate(zip(BLOCK_INPUTS, ours[1], eager[1], truth[1], strict=True)):
        if training and name == "the conv bias":
            # Zero in exact arithmetic under batch statistics: rounding noise on both sides, measured against
            # the size of the conv weight's gradient.
            assert_as_accurate(a, b, c, f"gradient of {name}", norm=True, scale=truth[1][1].norm())
        else:
            assert_as_accurate(a, b, c, f"gradient of {name}", norm=True, floor=gradient_floor(device))
    if training:
        for name, a, b, c in zip(("running mean", "running var"), stats["ours"], stats["eager"], stats["truth"]):
            assert_as_accurate(a, b, c, name)
    else:
        for name, a, c in zip(("running mean", "running var"), stats["ours"], params[4:]):
            assert torch.equal(a, c), f"{name} changed in eval mode"


@pytest.fixture(scope="module")
def authors_reference():
    """The authors' checkpoint and reference inputs; "not run: no weights" when they are not there,
    so that a GPU run without them says so rather than passing quietly."""
    folder = authors_files()
    if folder is None:
        pytest.skip(f"not run: no weights ({CHECKPOINT} is not under $LFM_SHARED, ./shared or ../shared)")
    load = dict(weights_only=True, map_location="cpu")
    return torch.load(folder / CHECKPOINT, **load), torch.load(folder / "reference_outputs.pt", **load)


@gpu
@pytest.mark.parametrize("precision", ["float32", "tf32"])
def test_lfm_parity_with_authors_checkpoint_on_gpu(authors_reference, precision):
    """Ours and the authors' code in float32 (cuDNN), each against the authors' code in float64. On CPU:
    tests/test_model.py, the same method."""
    state_dict, ref = authors_reference
    model = LFM(backend="triton", input_precision=PRECISIONS[precision][1]).cuda().eval()
    model.load_state_dict(state_dict)
    for size in (256, 224):
        x = ref[f"x{size}"].cuda()
        with torch.no_grad(), eager_as_deployed("cuda", precision):
            ours = model(x)
            eager = authors_outputs(state_dict, x, torch.float32)["logits"]
        truth = authors_outputs(state_dict, x, torch.float64)["logits"]
        assert_as_accurate(ours, eager, truth, f"logits at {size}")


@gpu
@pytest.mark.parametrize("precision", ["float32", "tf32"])
def test_lfm_training_step_on_gpu(precision):
    """A training step without dropout (the authors' code with p = 0) of ours and of the authors' code
    (cuDNN), each against the authors' code in float64: logits, every gradient, running statistics. On CPU:
    tests/test_model.py, the same method."""
    torch.manual_seed(0)
    state_dict = LFM(dropout="off").state_dict()
    x = torch.randn(32, 3, 224, 224, device="cuda")
    y = torch.randint(0, 2, (32, 1), device="cuda").float()
    runs = {}
    with eager_as_deployed("cuda", precision):
        for name, model, dtype in (
                ("ours", LFM(dropout="off", backend="triton", input_precision=PRECISIONS[precision][1]),
                 torch.float32),
                ("authors", AuthorsLFM(pmin=0.0), torch.float32), ("truth", AuthorsLFM(pmin=0.0), torch.float64)):
            model.load_state_dict(state_dict)
            runs[name] = training_step(model.cuda(), x, y, dtype)
    assert_training_step_as_accurate(runs["ours"], runs["authors"], runs["truth"], floor=None)


@gpu
def test_ops_under_torch_compile():
    feat = torch.randn(64, 512, 30, 30, device="cuda", requires_grad=True)
    weight = torch.randn(64, 512, 1, 1, device="cuda") / 512**0.5

    def head(x, w):
        top = score_topk(x, w, 16, drop=(0.1, 0.3), training=True)
        return top.sum() + topk_pool(x[:, :8], 16).sum() + random_k_pool(x[:, :8], 16).sum()

    torch.compile(head, fullgraph=True)(feat, weight).backward()
    assert feat.grad is not None and torch.isfinite(feat.grad).all()


@gpu
def test_lfm_compiles_on_gpu():
    """The compiled model and the authors' code in float32, each against the authors' code in float64."""
    torch.manual_seed(0)
    model = LFM(backend="triton", input_precision="ieee").cuda().eval()
    x = torch.randn(8, 3, 256, 256, device="cuda")
    state_dict = model.state_dict()
    with torch.no_grad(), eager_as_deployed("cuda", "float32"):
        compiled = torch.compile(model, fullgraph=True)(x)
        eager = authors_outputs(state_dict, x, torch.float32)["logits"]
    assert_as_accurate(compiled, eager, authors_outputs(state_dict, x, torch.float64)["logits"], "logits")
