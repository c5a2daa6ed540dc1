import pytest
import torch
from utils import (
    NETWORK_FLOOR,
    assert_as_accurate,
    assert_module_as_accurate,
    assert_nan_and_as_accurate,
    block_params,
    recorded_launches,
)

from lfm import LFM
from lfm_kernels import snet_head, snet_head_reference

CASES = [  # (B, Cin, Cout, H, W, npr, pool)
    (2, 3, 16, 9, 11, True, True),     # stem: residual fused, odd sizes
    (2, 20, 24, 8, 7, False, True),    # odd conv output: last row/col outside every pool window
    (1, 20, 40, 7, 8, False, False),   # block 4: no pool, Cout not a power of 2
]


def test_head_matches_block_then_score_topk(tiles):
    """Under GPU tiles the batch is too small to give every SM a program, so the head splits its 40 channels
    (16 + 16 + 8) and the chunk kernel sums the partial scores before selecting."""
    x = torch.randn(2, 24, 9, 10, dtype=torch.float64)
    params = block_params(24, 40, dtype=torch.float64)
    score_weight = torch.randn(20, 40, 1, 1, dtype=torch.float64) / 40**0.5
    with recorded_launches() as launches:
        values, idx = snet_head(x.float(), *[p.float() for p in params], score_weight.float(), 5,
                                input_precision="ieee", return_indices=True, backend="triton")
    head = [launch.name for launch in launches if launch.name.startswith("_snet_head")]
    assert head == ["_snet_head_partial_kernel" if tiles != "interpreter tiles" else "_snet_head_candidates_kernel"]
    ref_values, ref_idx = snet_head_reference(x, *params, score_weight, 5, return_indices=True)
    ref32 = snet_head_reference(x.float(), *[p.float() for p in params], score_weight.float(), 5)
    assert_as_accurate(values, ref32, ref_values, "Top-K values", norm=True)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("tiles", ["interpreter tiles", pytest.param("sm90 tiles", marks=pytest.mark.slow)],
                         indirect=True)
def test_lfm_triton_eval_launches(official, tiles):
    """6 launches; 7 where the batch is too small to give every SM a program, so that the head splits its
    channels and a selection kernel sums the partial scores (gpu tiles at batch 1)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    launches = []

    class CountComputeOps(TorchDispatchMode):
        skip = {"empty", "empty_strided", "view", "_unsafe_view", "t", "detach", "alias", "as_strided", "expand",
                "reshape", "permute", "transpose", "lift_fresh", "_to_copy"}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in self.skip and not name.startswith("lfm::") and func.namespace != "lfm":
                launches.append(name)
            return func(*args, **(kwargs or {}))

    model = LFM(backend="triton").eval()
    model.load_state_dict(official["state_dict"])
    x = official["outputs"]["x224"][:1, :, :64, :64]
    with torch.no_grad(), recorded_launches() as kernels, CountComputeOps():
        logits = model(x)
    launches += [launch.name for launch in kernels]
    split = tiles != "interpreter tiles"
    assert [n for n in launches if n.startswith("_snet_head")] == [
        "_snet_head_partial_kernel" if split else "_snet_head_candidates_kernel"]
    assert len(launches) == (6 if tiles == "interpreter tiles" else 7), launches
    reference = LFM(backend="torch").eval()
    reference.load_state_dict(official["state_dict"])
    assert_module_as_accurate(logits, reference, x, floor=NETWORK_FLOOR)


def test_head_nan_propagates():
    x = torch.randn(1, 8, 7, 7)
    x[0, 2, 3, 3] = float("nan")
    params = block_params(8, 16)
    score_weight = torch.randn(4, 16, 1, 1)
    values = snet_head(x, *params, score_weight, 8, backend="triton")  # 4 positions of NaN, 4 finite
    ref = snet_head_reference(x, *params, score_weight, 8)
    truth = snet_head_reference(x.double(), *[p.double() for p in params], score_weight.double(), 8)
    assert_nan_and_as_accurate(values, ref, truth, "Top-K values", norm=True)
    assert torch.isnan(values).any() and torch.isfinite(values).any()


def _kernel_precisions(run):
    """The PRECISION constexpr of every kernel launched by run()."""
    seen = {}
    with recorded_launches() as launches:
        run()
    for launch in launches:
        if "PRECISION" in launch.meta:
            seen.setdefault(launch.name, set()).add(launch.meta["PRECISION"])
    return seen


def test_tf32_follows_torchs_cudnn_switch_in_eval_and_training():
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    params = [t.requires_grad_(i < 4) for i, t in enumerate(block_params(8, 16))]
    score_weight = torch.randn(4, 16, 1, 1, requires_grad=True)

    def eval_and_train(**precision):
        with torch.no_grad():  # the fused head
            snet_head(x, *params, score_weight, 3, backend="triton", **precision)
        snet_head(x, *params, score_weight, 3, training=True, backend="triton", **precision).sum().backward()

    assert _kernel_precisions(eval_and_train) == {
        name: {"tf32"} for name in ("_snet_block_stats_kernel", "_snet_head_candidates_kernel",
                                    "_score_topk_chunk_kernel", "_snet_block_dy_sums_kernel", "_conv2x2_dw_kernel",
                                    "_conv2x2_dx_kernel", "_score_topk_dfeat_kernel")}
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        seen = _kernel_precisions(eval_and_train)
        assert set().union(*seen.values()) == {"ieee"}, seen
        seen = _kernel_precisions(lambda: eval_and_train(input_precision="tf32"))
        assert set().union(*seen.values()) == {"tf32"}, seen
