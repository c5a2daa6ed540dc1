"""The NPR baseline and LFM's global-average-pooling ablation."""
import copy

import pytest
import torch
import torch.nn.functional as F
from utils import assert_as_accurate

from lfm import LFM, LFMGAP, NPR


def _anchor_residual(x):
    """x - x[..., 2*(i//2), 2*(j//2)], written out independently of lfm_kernels."""
    h, w = x.shape[2:]
    anchors = x[..., ::2, ::2].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[..., :h, :w]
    return x - anchors


def test_npr_is_resnet50_cut_after_layer2():
    model = NPR()
    # stem 3*64*9 + BN 128; layer1 3 bottlenecks (215,808); layer2 4 bottlenecks (1,219,584); fc 513.
    assert sum(p.numel() for p in model.parameters()) == 1_437_761
    assert [len(model.layer1), len(model.layer2)] == [3, 4]
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (2, 2))
    assert (model.maxpool.kernel_size, model.maxpool.stride) == (3, 2)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].downsample is not None
    assert (model.fc1.in_features, model.fc1.out_features) == (512, 1)


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 33, 50)])
def test_npr_feeds_two_thirds_of_the_signed_residual(shape):
    torch.manual_seed(0)
    model = NPR(backend="torch").eval()
    x = torch.randn(shape)
    seen = {}
    hook = model.conv1.register_forward_pre_hook(lambda module, args: seen.setdefault("input", args[0]))
    logits = model(x)
    hook.remove()
    assert logits.shape == (shape[0], 1)
    # The residual times 2/3: the difference and the product rounded to float32.
    assert_as_accurate(seen["input"], None, _anchor_residual(x.double()) * (2 / 3), "input of conv1", floor=2**-23)

    def written_out(model, residual):
        feats = model.layer2(model.layer1(model.maxpool(F.relu(model.bn1(model.conv1(residual))))))
        assert feats.shape[1] == 512
        return model.fc1(feats.mean((2, 3)))

    with torch.no_grad():
        truth = written_out(copy.deepcopy(model).double(), _anchor_residual(x.double()) * (2 / 3))
        reference = written_out(model, _anchor_residual(x) * (2 / 3))
    assert_as_accurate(logits, reference, truth, "logits")


def test_npr_learns_a_nearest_upsampling_trace():
    torch.manual_seed(0)
    real = torch.randn(8, 3, 32, 32)
    fake = F.interpolate(torch.randn(8, 3, 16, 16), scale_factor=2, mode="nearest")
    x, y = torch.cat([real, fake]), torch.cat([torch.zeros(8, 1), torch.ones(8, 1)])
    model = NPR(backend="torch")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in model.parameters())


def test_lfm_gap_averages_the_score_maps():
    torch.manual_seed(0)
    model = LFMGAP(backend="torch").eval()
    x = torch.randn(2, 3, 40, 47)  # GAP needs a single position only: smaller than LFM's 47x47 minimum
    logits = model(x)
    with torch.no_grad():
        reference, truth = (m.fc1(m.covn1_1(m.features(t)).mean((2, 3)))
                            for m, t in ((model, x), (copy.deepcopy(model).double(), x.double())))
    assert_as_accurate(logits, reference, truth, "logits")
    assert model.fc1.in_features == 64


def test_lfm_gap_shares_lfm_parameters_except_the_head():
    gap, lfm = LFMGAP().state_dict(), LFM().state_dict()
    assert list(gap) == list(lfm)
    assert all(gap[k].shape == lfm[k].shape for k in gap if not k.startswith("fc1"))
    assert gap["fc1.weight"].shape == (1, 64) and lfm["fc1.weight"].shape == (1, 1024)


def test_lfm_gap_trains():
    torch.manual_seed(0)
    model = LFMGAP(backend="torch").train()
    x = torch.randn(4, 3, 48, 48)
    loss = F.binary_cross_entropy_with_logits(model(x), torch.tensor([[0.0], [1.0], [0.0], [1.0]]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
