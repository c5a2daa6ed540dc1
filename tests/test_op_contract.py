"""What every public op promises, checked for each op from one table (one entry per op and mode; a new op
gets the whole contract by adding its entries to OPS):

- the Triton kernels agree with the PyTorch reference in float64, forward and backward, with the
  interpreter's tiles and with the tile sizes each GPU family gets; and for ops with dots, with every
  entry of the launch table (family x TF32 / 16-bit dots) within that precision's tolerance;
- its custom ops (those its forward and backward call) pass torch.library.opcheck;
- it compiles with torch.compile(fullgraph=True), forward and backward, on both backends;
- contiguous, channels_last and strided inputs give the same results;
- a tensor of the wrong rank or an integer dtype raises ValueError (a wrong device cannot be made on CPU);
- bfloat16 and float16 inputs agree with the float64 reference within tests/utils.py's DTYPE_TOL;
- an empty batch gives empty outputs and zero gradients without touching any state;
- an output that gets no gradient from downstream gives none (or zeros) to the inputs.

Ops that draw random numbers (`random=True`) are checked against their own Triton float32 run under the
same seed instead of the reference. Per-op files keep what is specific to their op."""
import contextlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from utils import BRANCH_FLIP_FLOOR, DTYPE_TOL, assert_as_accurate, distinct_map, layouts

from lfm_kernels import npr_residual, random_k_pool, score_topk, snet_block, snet_head, topk_pool
from lfm_kernels.configs import FAMILIES, gpu_family, gpu_tile_sizes


def _block_params(cin, cout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(cout, cin, 2, 2, generator=g, dtype=torch.float64) / (2 * cin**0.5),
            torch.randn(cout, generator=g, dtype=torch.float64) * 0.1,
            torch.rand(cout, generator=g, dtype=torch.float64) + 0.5,
            torch.randn(cout, generator=g, dtype=torch.float64) * 0.1]


def _running_stats(cout, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(cout, generator=g, dtype=torch.float64) * 0.1,
            torch.rand(cout, generator=g, dtype=torch.float64) + 0.5]


@dataclass
class OpCase:
    """inputs(B) -> (differentiable float64 tensors, the first a (B, C, H, W) batch; state tensors);
    run(backend, inputs, state, precision="ieee") -> output (precision: the float32 dots' input_precision,
    for ops with dots)."""
    name: str
    inputs: Callable
    run: Callable
    atol: float = 1e-5
    random: bool = False  # draws from torch's generator: compared with its own run under the same seed
    half_inputs: int = 1  # leading inputs given in bfloat16/float16: those a conv needs in one dtype (the rest,
    # BatchNorm's parameters, stay float32 as F.batch_norm allows)
    half_tol: float = 4.0  # DTYPE_TOL multiple for half-precision inputs
    dots: bool = False  # runs tl.dot: its launch configurations depend on the dot kind


def _image(B, C=3, H=11, W=10):
    return torch.randn(B, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(B))


OPS = [
    OpCase("npr_residual", lambda B: ([_image(B)], []),
           lambda backend, t, s: npr_residual(t[0], backend=backend)),
    OpCase("topk_pool", lambda B: ([distinct_map(B, 3, 9, 10, dtype=torch.float64)], []),
           lambda backend, t, s: topk_pool(t[0], 7, backend=backend), half_tol=1.0),
    OpCase("random_k_pool", lambda B: ([distinct_map(B, 3, 5, 6, dtype=torch.float64)], []),
           lambda backend, t, s: random_k_pool(t[0], 6, backend=backend), random=True),
    OpCase("score_topk", lambda B: ([_image(B, 24, 9, 10), torch.randn(20, 24, 1, 1, dtype=torch.float64)], []),
           lambda backend, t, s, precision="ieee": score_topk(t[0], t[1], 5, input_precision=precision,
                                                              backend=backend), half_inputs=2, dots=True),
    OpCase("snet_block eval", lambda B: ([_image(B, 20)] + _block_params(20, 40), _running_stats(40)),
           lambda backend, t, s, precision="ieee": snet_block(*t, *s, input_precision=precision, backend=backend),
           half_inputs=3, half_tol=8.0, dots=True),
    OpCase("snet_block train stem", lambda B: ([_image(B)] + _block_params(3, 24), _running_stats(24)),
           lambda backend, t, s, precision="ieee": snet_block(*t, *s, training=True, npr=True,
                                                              input_precision=precision, backend=backend),
           half_inputs=3, dots=True),
    OpCase("snet_block train no pool", lambda B: ([_image(B, 20)] + _block_params(20, 40), _running_stats(40)),
           lambda backend, t, s, precision="ieee": snet_block(*t, *s, training=True, pool=False,
                                                              input_precision=precision, backend=backend),
           half_inputs=3, dots=True),
    OpCase("snet_head eval", lambda B: ([_image(B, 20), *_block_params(20, 40)[:4],
                                         torch.randn(80, 40, 1, 1, dtype=torch.float64) / 40**0.5],
                                        _running_stats(40)),
           lambda backend, t, s, precision="ieee": snet_head(t[0], *t[1:5], *s, t[5], 3, input_precision=precision,
                                                             backend=backend), half_inputs=6, dots=True),
]


def _as(dtype, tensors, grad):
    return [t.to(dtype).requires_grad_(grad) for t in tensors]


def _seeded(case, backend, tensors, state):
    """case.run under a fixed seed, so that random ops draw the same numbers every time."""
    torch.manual_seed(0)
    return case.run(backend, tensors, state)


def _expected(case, inputs, state):
    """What the Triton run of these inputs must give: the float64 reference, or for a random op its own
    float32 run on contiguous inputs under the same seed."""
    if case.random:
        return _seeded(case, "triton", _as(torch.float32, [t.contiguous() for t in inputs], False),
                       _as(torch.float32, state, False)).double()
    return case.run("torch", _as(torch.float64, inputs, False), _as(torch.float64, state, False))


DETERMINISTIC_OPS = [case for case in OPS if not case.random]


@pytest.mark.parametrize("case", DETERMINISTIC_OPS, ids=lambda c: c.name)
def test_matches_reference_forward_and_backward(case, tiles):
    """Our kernels and the reference (the torch backend) in float32, each against the reference in float64:
    the output, running statistics (where training updates them) and every input's gradient."""
    inputs, state = case.inputs(2)
    runs = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float32), ("torch", torch.float64)):
        leaves, stats = _as(dtype, inputs, True), _as(dtype, state, False)
        out = case.run(backend, leaves, stats)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        runs.append((out.detach(), stats, torch.autograd.grad(out, leaves, grad)))
    ours, ref32, truth = runs
    assert_as_accurate(ours[0], ref32[0], truth[0], "output", norm=True)
    for i, sides in enumerate(zip(ours[1], ref32[1], truth[1])):
        assert_as_accurate(*sides, f"running statistic {i}")
    for i, sides in enumerate(zip(ours[2], ref32[2], truth[2])):
        if "train" in case.name and i == 2:
            # A conv bias before batch statistics has a gradient of exactly zero: rounding noise on both
            # sides, measured against the size of the conv weight's gradient.
            assert_as_accurate(*sides, f"gradient of input {i}", norm=True, scale=truth[2][1].norm())
        else:
            assert_as_accurate(*sides, f"gradient of input {i}", norm=True, floor=BRANCH_FLIP_FLOOR)


@pytest.mark.slow  # every launch-table entry: minutes under the interpreter
@pytest.mark.parametrize("kind", ["tf32", "16-bit"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", [case for case in OPS if case.dots], ids=lambda c: c.name)
def test_every_launch_configuration(case, family, kind):
    """The launch table's TF32 and 16-bit entries of each GPU family (its full-float32 entries run in
    test_matches_reference_forward_and_backward), with that family's tiles and small-batch splits, forward
    and backward. The interpreter computes TF32 dots in float32, so TF32 is held to float32's tolerance
    against the float64 reference: this checks the tiles, not TF32's rounding. 16-bit runs bfloat16
    inputs: the forward against the reference of the rounded inputs; the backward against the same run
    with the interpreter's tiles, because bfloat16 rounding flips a few ReLU gates and pool winners
    against float64, whose gradients then differ entirely, while other tiles only reorder float32 sums."""
    inputs, state = case.inputs(2)
    half = case.half_inputs if kind == "16-bit" else 0
    dtype = torch.bfloat16 if half else torch.float32

    def run(tiles):
        tensors = _as(dtype, inputs[:half], True) + _as(torch.float32, inputs[half:], True)
        with tiles:
            out = case.run("triton", tensors, _as(torch.float32, state, False), precision="tf32")
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            return out, torch.autograd.grad(out, tensors, grad.to(out.dtype)), tensors, grad

    @contextlib.contextmanager
    def family_tiles():
        with gpu_family(family), gpu_tile_sizes():
            yield

    out, grads, tensors, grad = run(family_tiles())
    ref_in = [t.detach().double().requires_grad_() for t in tensors]
    ref = case.run("torch", ref_in, _as(torch.float64, state, False))
    if half:
        tol = DTYPE_TOL[torch.bfloat16] * case.half_tol
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        expected, tol = run(contextlib.nullcontext())[1], DTYPE_TOL[torch.bfloat16]
    else:
        torch.testing.assert_close(out.double(), ref, atol=case.atol, rtol=1e-5)
        expected, tol = torch.autograd.grad(ref, ref_in, grad), 1e-4
    for i, (a, b) in enumerate(zip(grads, expected)):
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol, msg=lambda m, i=i: f"gradient {i}: {m}")


@pytest.mark.parametrize("case", OPS, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(case, backend):
    inputs, state = case.inputs(0)
    tensors, state = _as(torch.float32, inputs, True), _as(torch.float32, state, False)
    before = [s.clone() for s in state]
    out = case.run(backend, tensors, state)
    assert out.shape[0] == 0
    assert case.run("torch", _as(torch.float32, inputs, True), _as(torch.float32, case.inputs(0)[1], False)).shape \
        == out.shape
    for s, b in zip(state, before):  # an empty batch never touches the running statistics
        assert torch.equal(s, b)
    grads = torch.autograd.grad(out.sum(), tensors, allow_unused=True)
    for t, g in zip(tensors, grads):
        assert g is None or (g.shape == t.shape and not g.any())


class _DropsGradient(torch.autograd.Function):
    """Identity whose backward gives no gradient: what a node downstream of an op may hand back."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("case", OPS, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_output_without_gradient_gives_none_or_zero_gradients(case, backend):
    inputs, state = case.inputs(2)
    tensors, state = _as(torch.float32, inputs, True), _as(torch.float32, state, False)
    out = _DropsGradient.apply(case.run(backend, tensors, state))
    anchor = tensors[0].sum()  # something to differentiate, so that the op's backward runs with no gradient
    grads = torch.autograd.grad(out.sum() + anchor, tensors, allow_unused=True)
    for i, (t, g) in enumerate(zip(tensors, grads)):
        expected = torch.ones_like(t) if i == 0 else torch.zeros_like(t)
        assert g is None and i > 0 or torch.equal(g, expected), f"gradient {i}"


@pytest.mark.parametrize("case", DETERMINISTIC_OPS, ids=lambda c: c.name)
def test_a_second_derivative_raises_where_the_reference_has_one(case):
    # Our backwards have no derivative of their own. Differentiating a gradient that depends on the inputs
    # must raise (the backward op's missing autograd formula), never give the first-order part alone.
    inputs, state = case.inputs(2)
    grads = {}
    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        tensors = _as(dtype, inputs, True)
        out = case.run(backend, tensors, _as(dtype, state, False))
        seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
        grads[backend] = torch.autograd.grad(out, tensors, seed, create_graph=True, allow_unused=True)
    second_order = [i for i, g in enumerate(grads["torch"]) if g is not None and g.requires_grad]
    for i in second_order:
        assert grads["triton"][i].requires_grad, f"gradient {i} lost its dependence on the inputs"
        with pytest.raises(RuntimeError, match="autograd formula"):
            grads["triton"][i].sum().backward()
    if case.name.startswith("snet_block"):
        assert second_order, "a block's weight gradient depends on its input"


class _RecordCustomOps(TorchDispatchMode):
    """Records the first call of each lfm:: custom op with its arguments; with `detach`, tensors detached
    (backward ops have no autograd formula of their own)."""

    def __init__(self, calls: dict, detach: bool):
        super().__init__()
        self.calls, self.detach = calls, detach

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lfm":
            self.calls.setdefault(func, tuple(a.detach() if self.detach and isinstance(a, torch.Tensor) else a
                                              for a in args))
        return func(*args, **(kwargs or {}))


@pytest.mark.slow  # opcheck runs each custom op several times under the interpreter
@pytest.mark.parametrize("case", OPS, ids=lambda c: c.name)
def test_opcheck_of_every_custom_op_it_calls(case):
    inputs, state = case.inputs(2)
    tensors, calls = _as(torch.float32, inputs, True), {}
    with _RecordCustomOps(calls, detach=False):
        out = case.run("triton", tensors, _as(torch.float32, state, False))
    with _RecordCustomOps(calls, detach=True):
        torch.autograd.grad(out, tensors, torch.randn_like(out), allow_unused=True)
    with _RecordCustomOps(calls, detach=True), torch.no_grad():  # inference takes its own ops (snet_head_eval)
        case.run("triton", tensors, _as(torch.float32, state, False))
    assert calls, "the triton backend called no lfm:: op"
    for op, args in calls.items():
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", OPS, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_without_graph_break(case, backend):
    torch._dynamo.reset()  # every case compiles the same lambda: no recompilation limit across cases
    inputs, state = case.inputs(2)
    eager_in, compiled_in = _as(torch.float32, inputs, True), _as(torch.float32, inputs, True)
    eager_state, compiled_state = _as(torch.float32, state, False), _as(torch.float32, state, False)
    compiled = torch.compile(lambda *t: case.run(backend, list(t), compiled_state), backend="aot_eager",
                             fullgraph=True)
    torch.manual_seed(0)
    out = compiled(*compiled_in)
    expected = _seeded(case, backend, eager_in, eager_state)
    torch.testing.assert_close(out, expected, atol=case.atol, rtol=1e-5)
    for mine, theirs in zip(compiled_state, eager_state):
        torch.testing.assert_close(mine, theirs)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, compiled_in, grad, allow_unused=True),
                    torch.autograd.grad(expected, eager_in, grad, allow_unused=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", OPS, ids=lambda c: c.name)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_memory_layouts(case, layout):
    inputs, state = case.inputs(2)
    batch = layouts(inputs[0].float())[layout]
    out = _seeded(case, "triton", [batch] + _as(torch.float32, inputs[1:], False), _as(torch.float32, state, False))
    if case.random:  # a selection: exactly its own run on contiguous inputs
        assert torch.equal(out.double(), _expected(case, inputs, state))
    else:
        reference = case.run("torch", _as(torch.float32, inputs, False), _as(torch.float32, state, False))
        assert_as_accurate(out, reference, _expected(case, inputs, state), f"output, {layout}", norm=True)


@pytest.mark.parametrize("case", OPS, ids=lambda c: c.name)
@pytest.mark.parametrize("bad,match", [(lambda x: x[0], "4 dimensions"),
                                       (lambda x: x.to(torch.int64), "floating-point")],
                         ids=["wrong ndim", "integer dtype"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_tensor_raises_value_error(case, bad, match, backend):
    inputs, state = case.inputs(2)
    tensors, state = _as(torch.float32, inputs, False), _as(torch.float32, state, False)
    with pytest.raises(ValueError, match=match):
        case.run(backend, [bad(tensors[0])] + tensors[1:], state)


@pytest.mark.parametrize("case", OPS, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(case, dtype):
    inputs, state = case.inputs(2)
    half, rest = inputs[:case.half_inputs], inputs[case.half_inputs:]
    out = _seeded(case, "triton", _as(dtype, half, False) + _as(torch.float32, rest, False),
                  _as(torch.float32, state, False))
    assert out.dtype == dtype
    rounded = [t.to(dtype).double() for t in half] + rest  # the reference sees the inputs the op was given
    tol = DTYPE_TOL[dtype] * case.half_tol
    torch.testing.assert_close(out.double(), _expected(case, rounded, state), atol=tol, rtol=tol)

