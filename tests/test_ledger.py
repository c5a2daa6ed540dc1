"""The byte and launch ledger (bench/ledger.py): on CPU, meta tensors or stubbed launches, a few seconds."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.ledger import LEDGER_BATCH, TrafficCounter, ledger, stubbed_launches, tensor_bytes
from bench.providers import build_model
from bench.workloads import cpu_tensors_take_the_triton_path
from lfm_kernels import npr_residual, score_topk
from lfm_kernels.configs import observe_launches

MB = 1e6


@pytest.fixture(scope="module")
def rows_256():
    """{(provider, dtype): LedgerRow} at 256x256, batch 32."""
    return {(r.provider, r.dtype): r for r in ledger(sizes=(256,))}


def test_views_allocations_and_like_factories_move_nothing_real_ops_count_once():
    x = torch.randn(4, 6)
    nbytes = x.numel() * x.element_size()
    with TrafficCounter() as free:
        x.view(6, 4).reshape(24).expand(2, 24)
        x.permute(1, 0).t().detach()
        torch.empty_like(x)
        x.new_zeros(3)  # writes its 3 zeros, does not read x
    assert (free.traffic.launches, free.traffic.bytes) == (1, 3 * 4)
    with TrafficCounter() as real:
        y = x + 1  # reads x, writes y
        y.relu_()  # in place: reads and writes y
        x.expand(5, 4, 6).sum()  # an expanded input is read once
    assert real.traffic.launches == 3
    assert real.traffic.bytes == 2 * nbytes + 2 * nbytes + nbytes + 4
    assert tensor_bytes(x.expand(5, 4, 6)) == nbytes


def test_weight_preprocessing_is_tallied_apart():
    x, w = torch.randn(3, 4), torch.randn(4, 5)
    with TrafficCounter(weights=[w]) as counter:
        folded = w[:, None] * 2  # reads only a weight (through a view): done once by a model, not per call
        x @ (folded.squeeze(1) + 1)
        torch.rand(3)  # reads nothing: per call
    assert dict(counter.weight_traffic.launches_by_op) == {"aten.mul": 1, "aten.add": 1}
    assert dict(counter.traffic.launches_by_op) == {"aten.mm": 1, "aten.rand": 1}


def test_eager_bytes_per_image_are_near_the_back_of_the_envelope_estimate(rows_256):
    # Estimate: about 40 M elements (160 MB) moved per image by eager float32 at 256x256. The ledger counts
    # more (about 220 MB): BatchNorm and ReLU each read and write every pre-pool map, and max-pool also
    # writes int64 indices.
    eager = rows_256["eager", torch.float32]
    assert 120 <= eager.bytes_per_image() / MB <= 260
    # bfloat16 halves everything but the int64 pool indices.
    assert 0.45 <= rows_256["eager", torch.bfloat16].bytes_per_image() / eager.bytes_per_image() <= 0.6
    assert eager.bytes_per_image(training=True) > 2 * eager.bytes_per_image()


def test_launch_counts(rows_256):
    for row in rows_256.values():
        assert row.inference.launches > 0 and row.training.launches > 0
    eager = rows_256["eager", torch.float32]
    assert (eager.inference.launches, eager.training.launches) == (22, 64)  # see bench.ledger --by-op
    assert not any(name.startswith("lfm.") for name in eager.inference.by_op)
    triton = rows_256["triton", torch.float32].inference
    assert any(name.startswith("lfm.") for name in triton.by_op)
    assert triton.launches <= 6  # the fused eval forward is a handful of ops
    # The torch provider as on a GPU: each op of the cuDNN composition once (its CPU path, by cache-sized
    # chunks of images, would launch over a thousand), and no CPU training path.
    composed = rows_256["torch", torch.float32]
    assert composed.inference.launches < 100 and composed.training.launches < 2 * eager.training.launches


def fused_ops(x, feat, weight):
    npr_residual(x, backend="triton")
    score_topk(feat, weight, 16, backend="triton")


def test_fused_ops_count_the_kernels_they_launch():
    x, feat, weight = torch.randn(2, 3, 64, 64), torch.randn(2, 512, 6, 6), torch.randn(64, 512, 1, 1)
    kernels = []
    with stubbed_launches(), observe_launches(lambda launch: kernels.append(launch.name)):
        with TrafficCounter() as counter:
            fused_ops(x, feat, weight)
    traffic = counter.traffic
    assert kernels[0] == "_npr_residual_fwd_kernel" and len(kernels) >= 3  # the scoring's chunks, then a merge
    assert {op: n for op, n in traffic.launches_by_op.items() if op.startswith("lfm.")} == {
        "lfm.npr_residual": 1, "lfm.score_topk": len(kernels) - 1}
    assert traffic.by_op["lfm.npr_residual"] == 2 * x.numel() * 4  # read x, write the residual
    # On fake tensors no kernel runs: each dispatched op counts one launch.
    with FakeTensorMode():
        fake = (torch.randn(2, 3, 64, 64), torch.randn(2, 512, 6, 6), torch.randn(64, 512, 1, 1))
        with cpu_tensors_take_the_triton_path(), TrafficCounter() as counter:
            fused_ops(*fake)
    assert {op: n for op, n in counter.traffic.launches_by_op.items() if op.startswith("lfm.")} == {
        "lfm.npr_residual": 1, "lfm.score_topk": 1}


def test_triton_launches_are_the_kernels_a_forward_launches(rows_256):
    kernels = []
    model = build_model("triton", torch.float32, "cpu")
    with stubbed_launches(), observe_launches(kernels.append), torch.no_grad():
        model(torch.randn(LEDGER_BATCH, 3, 256, 256))
    inference = rows_256["triton", torch.float32].inference
    fused = sum(n for op, n in inference.launches_by_op.items() if op.startswith("lfm."))
    assert fused == len(kernels) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_inference_moves_at_most_15_percent_of_eager_bytes(rows_256, dtype):
    # The fused SNet writes only pooled maps: about 4 M elements per image instead of 50 M.
    triton, eager = rows_256["triton", dtype], rows_256["eager", dtype]
    assert triton.bytes_per_image() <= 0.15 * eager.bytes_per_image()


@torch.library.custom_op("ledger_test::residual_then_sum", mutates_args=())
def residual_then_sum(x: torch.Tensor) -> torch.Tensor:
    """A fused op as ours are built: torch ops around the kernels of another op of ours."""
    return torch.ops.lfm.npr_residual(x.mul(2), 2, True).sum(0)


@residual_then_sum.register_fake
def _(x):
    return x.new_empty(x.shape[1:])


def test_the_torch_ops_inside_our_ops_are_launches_too():
    # Our ops run torch ops around their kernels (statistics merges, casts, allocations that fill): on a GPU
    # each is a launch of its own. The op itself counts the kernels it launches, not those of an op it calls.
    x = torch.randn(2, 3, 64, 64)
    kernels = []
    with stubbed_launches(), observe_launches(lambda launch: kernels.append(launch.name)):
        with TrafficCounter() as counter:
            residual_then_sum(x)
    assert kernels == ["_npr_residual_fwd_kernel"]
    assert dict(counter.traffic.launches_by_op) == {"aten.mul": 1, "lfm.npr_residual": 1, "aten.sum": 1}
    with FakeTensorMode():  # nothing inside is visible: the op is one launch
        fake = torch.randn(2, 3, 64, 64)
        with cpu_tensors_take_the_triton_path(), TrafficCounter() as counter:
            residual_then_sum(fake)
    assert dict(counter.traffic.launches_by_op) == {"ledger_test.residual_then_sum": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_triton_training_step_launches_at_most_20_percent_more_than_eager(rows_256, dtype):
    # Every op counts, those inside our ops too (on a GPU each costs a launch and host time): the per-program
    # partials of the statistics and gradient sums are merged by kernels of ours, not by chains of torch
    # reductions; no gradient is zero-filled for outputs that have none; a block's running statistics take one
    # op, towards targets the statistics kernel writes in their dtype; one launch sums dy and dy * zhat; the
    # backward reuses the forward's packed weight.
    triton, eager = rows_256["triton", dtype].training, rows_256["eager", dtype].training
    assert triton.launches <= 1.2 * eager.launches
    assert not {"aten.lerp_", "aten._to_copy"} & set(triton.launches_by_op)
    assert not {"aten.zeros_like", "aten.stack", "aten.rsqrt", "aten.pow"} & set(triton.launches_by_op)
    assert triton.launches_by_op["aten.sum"] <= 1 and triton.launches_by_op["aten.zeros"] <= 1
