"""lfm_kernels.fuse: the authors' way of writing LFM, rewritten to SNetBlock / ScoreTopK with the same outputs."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from utils import (
    NETWORK_FLOOR,
    assert_authors_logits,
    assert_module_as_accurate,
    assert_training_step_as_accurate,
    training_step,
)

from lfm.model import _frozen_npr_conv  # the authors' residual convs (identity at the top-left pixel)
from lfm_kernels import fuse
from lfm_kernels.nn import ScoreTopK, SNetBlock

CHANNELS = (3, 64, 128, 256, 512)
POOLS = {
    "F.max_pool2d": lambda x: F.max_pool2d(x, 2),
    "torch.max_pool2d": lambda x: torch.max_pool2d(x, 2, 2),
}


def _topk_of_flatten(maps, k):
    return torch.topk(maps.flatten(2), k, dim=-1)[0]


def _topk_of_view(maps, k):
    batch, channels, height, width = maps.shape
    return torch.topk(maps.view(batch, channels, -1), k=k, dim=-1, sorted=True).values


class AuthorsSNet(nn.Module):
    """SNet as the authors write it: nn.Sequential(conv, bn, relu) blocks, the max-pool called in forward
    (or, as in their repository, one nn.MaxPool2d module shared by blocks 1-3)."""

    def __init__(self, pool="F.max_pool2d"):
        super().__init__()
        for i, (cin, cout) in enumerate(zip(CHANNELS[:-1], CHANNELS[1:]), start=1):
            self.add_module(f"layer{i}", nn.Sequential(nn.Conv2d(cin, cout, kernel_size=2), nn.BatchNorm2d(cout),
                                                       nn.ReLU()))
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2) if pool == "nn.MaxPool2d" else POOLS[pool]

    def forward(self, x):
        for layer in (self.layer1, self.layer2, self.layer3):
            x = self.pool(layer(x))
        return self.layer4(x)


class AuthorsLFM(nn.Module):
    def __init__(self, pool="F.max_pool2d", topk=_topk_of_flatten, k=16):
        super().__init__()
        self.k, self.topk = k, topk
        self.downsample_conv = _frozen_npr_conv(transposed=False)
        self.upsample_conv = _frozen_npr_conv(transposed=True)
        self.cnn = AuthorsSNet(pool)
        self.covn1_1 = nn.Conv2d(512, 64, kernel_size=1, bias=False)
        self.fc1 = nn.Linear(64 * k, 1)

    def forward(self, x):
        residual = x - self.upsample_conv(self.downsample_conv(x))
        top = self.topk(self.covn1_1(self.cnn(abs(residual))), self.k)
        return self.fc1(top.reshape(top.size(0), -1))


def _randomized(model, seed=0):
    """`model` with random BatchNorm affine parameters and running statistics (not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            n = bn.num_features
            if bn.affine:
                bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=g) * 0.1)
            if bn.track_running_stats:
                bn.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def _authors_model(**kwargs):
    torch.manual_seed(0)
    return _randomized(AuthorsLFM(**kwargs)).eval()


def _called(gm, cls):
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and type(gm.get_submodule(n.target)) is cls]


def _calls(gm, *targets):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target in targets]


def _image(batch=2, size=48, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("topk", [_topk_of_flatten, _topk_of_view])
@pytest.mark.parametrize("pool", ["F.max_pool2d", "torch.max_pool2d", "nn.MaxPool2d"])
def test_authors_model_is_fused_with_the_same_outputs(pool, topk):
    model = _authors_model(pool=pool, topk=topk)
    fused = fuse(model, backend="torch").eval()
    assert isinstance(fused, fx.GraphModule)
    assert [block.pool for block in _called(fused, SNetBlock)] == [True, True, True, False]
    assert [head.k for head in _called(fused, ScoreTopK)] == [16]
    assert [n.target for n in fused.graph.nodes if n.op == "call_module"] == [
        "downsample_conv", "upsample_conv", "cnn.layer1", "cnn.layer2", "cnn.layer3", "cnn.layer4", "covn1_1", "fc1"]
    assert not _called(fused, nn.BatchNorm2d) and not _called(fused, nn.MaxPool2d)
    assert not _calls(fused, F.max_pool2d, torch.max_pool2d, torch.topk, "topk", F.relu, torch.relu)
    assert not hasattr(fused.cnn, "pool")  # the shared nn.MaxPool2d went with its last use
    assert isinstance(model.cnn.layer1, nn.Sequential)  # the model itself is not modified
    x = _image()
    with torch.no_grad():
        assert_module_as_accurate(fused(x), model, x, floor=NETWORK_FLOOR)


def test_triton_backend_matches_the_authors_model():
    model = _authors_model()
    fused = fuse(model, backend="triton").eval()
    assert {m.backend for m in _called(fused, SNetBlock) + _called(fused, ScoreTopK)} == {"triton"}
    x = _image()
    with torch.no_grad():
        assert_module_as_accurate(fused(x), model, x, floor=NETWORK_FLOOR)


def test_state_dict_keys_and_values_are_preserved_in_copies():
    model = _authors_model(topk=_topk_of_view)
    original, fused = model.state_dict(), fuse(model).state_dict()
    assert list(fused) == list(original)
    for name, value in original.items():
        assert torch.equal(fused[name], value), name
        assert fused[name].data_ptr() != value.data_ptr(), name  # fuse works on a copy


def test_authors_checkpoint_gives_their_logits_after_fusing(official, authors_logits):
    model = AuthorsLFM().eval()
    model.load_state_dict(official["state_dict"], strict=True)
    fused = fuse(model, backend="torch").eval()
    fused.load_state_dict(official["state_dict"], strict=True)
    with torch.no_grad():
        assert_authors_logits(fused(authors_logits["x224"][0]), authors_logits, "x224")


def test_training_step_gives_the_same_gradients_and_running_stats():
    """The fused model and the authors' in float32, each against the authors' in float64: logits, every
    parameter's gradient and running statistic."""
    model = _authors_model(topk=_topk_of_view)
    fused = fuse(model, backend="torch")
    truth_model = copy.deepcopy(model)
    x, y = _image(seed=2), torch.tensor([[1.0], [0.0]])
    runs = [training_step(m, x, y, dtype) for m, dtype in ((fused, torch.float32), (model, torch.float32),
                                                          (truth_model, torch.float64))]
    assert all(p.grad is not None for p in fused.parameters() if p.requires_grad)
    assert_training_step_as_accurate(*runs)
    assert fused.get_buffer("cnn.layer1.1.num_batches_tracked") == model.cnn.layer1[1].num_batches_tracked == 1


def test_fusing_again_keeps_the_fused_modules_and_bad_backend_is_refused():
    fused = fuse(_authors_model(), backend="torch").eval()
    assert str(fuse(fused).graph) == str(fused.graph)
    wrapped = fuse(nn.Sequential(fused)).eval()  # traced anew: the fused modules stay leaves
    assert len(_called(wrapped, SNetBlock)) == 4 and len(_called(wrapped, ScoreTopK)) == 1
    x = _image()
    with torch.no_grad():  # the same modules on the same input: bit for bit
        torch.testing.assert_close(wrapped(x), fused(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="backend"):
        fuse(_authors_model(), backend="cuda")


# ---------------------------------------------------------------------------------------------
# Strictness: small patterns that must be left alone (or fused only in part)
# ---------------------------------------------------------------------------------------------
class ConvBNReLU(nn.Module):
    """conv -> bn -> relu as separate attributes, then `tail(relu out, bn out, conv out)`."""

    def __init__(self, tail, conv=None, bn=None):
        super().__init__()
        self.conv = conv if conv is not None else nn.Conv2d(3, 4, 2)
        self.bn = bn if bn is not None else nn.BatchNorm2d(4)
        self.tail = tail

    def forward(self, x):
        conv_out = self.conv(x)
        bn_out = self.bn(conv_out)
        return self.tail(F.relu(bn_out), bn_out, conv_out)


class ScoreHead(nn.Module):
    """A 1x1 conv, then `tail(scores)`."""

    def __init__(self, tail, conv=None):
        super().__init__()
        self.conv = conv if conv is not None else nn.Conv2d(4, 3, 1, bias=False)
        self.tail = tail

    def forward(self, x):
        return self.tail(self.conv(x))


def _pooled(relu, bn_out, conv_out):
    return F.max_pool2d(relu, 2)


def _top3(scores):
    return torch.topk(scores.flatten(2), 3, dim=-1)[0]


def _fused_and_close(model, x):
    model = _randomized(model).eval()
    fused = fuse(model, backend="torch").eval()
    with torch.no_grad():
        assert_module_as_accurate(fused(x), model, x, "output", norm=True)
    return fused


LEFT_ALONE = {  # name: model factory
    "bn output used twice": lambda: ConvBNReLU(lambda relu, bn_out, conv_out: relu + bn_out),
    "conv output used twice": lambda: ConvBNReLU(lambda relu, bn_out, conv_out: relu + conv_out),
    "conv padding=1": lambda: ConvBNReLU(_pooled, conv=nn.Conv2d(3, 4, 2, padding=1)),
    "conv stride 2": lambda: ConvBNReLU(_pooled, conv=nn.Conv2d(3, 4, 2, stride=2)),
    "conv dilation 2": lambda: ConvBNReLU(_pooled, conv=nn.Conv2d(3, 4, 2, dilation=2)),
    "conv kernel 3": lambda: ConvBNReLU(_pooled, conv=nn.Conv2d(3, 4, 3)),
    "grouped conv": lambda: ConvBNReLU(_pooled, conv=nn.Conv2d(4, 4, 2, groups=2)),
    "bn without affine": lambda: ConvBNReLU(_pooled, bn=nn.BatchNorm2d(4, affine=False)),
    "bn without running stats": lambda: ConvBNReLU(_pooled, bn=nn.BatchNorm2d(4, track_running_stats=False)),
    "score map used twice": lambda: ScoreHead(lambda s: _top3(s) + s.mean()),
    "top-k indices used": lambda: ScoreHead(lambda s: torch.topk(s.flatten(2), 3, dim=-1)[1].float()),
    "smallest k": lambda: ScoreHead(lambda s: torch.topk(s.flatten(2), 3, dim=-1, largest=False)[0]),
    "unsorted": lambda: ScoreHead(lambda s: torch.topk(s.flatten(2), 3, dim=-1, sorted=False)[0]),
    "top-k over channels": lambda: ScoreHead(lambda s: torch.topk(s.flatten(2), 2, dim=1)[0]),
    "flatten from dim 1": lambda: ScoreHead(lambda s: torch.topk(s.flatten(1), 3, dim=-1)[0]),
    "batch size reused": lambda: ScoreHead(
        lambda s: torch.topk(s.view(s.size(0), s.size(1), -1), 3, dim=-1)[0].view(s.size(0), -1)),
    "score conv with bias": lambda: ScoreHead(_top3, conv=nn.Conv2d(4, 3, 1)),
    "score conv stride 2": lambda: ScoreHead(_top3, conv=nn.Conv2d(4, 3, 1, stride=2, bias=False)),
}


@pytest.mark.parametrize("name", list(LEFT_ALONE))
def test_patterns_the_fused_ops_do_not_implement_are_left_alone(name):
    model = LEFT_ALONE[name]()
    fused = _fused_and_close(model, torch.randn(2, model.conv.in_channels, 9, 9))
    assert str(fused.graph) == str(fx.symbolic_trace(model).graph)
    assert not _called(fused, SNetBlock) and not _called(fused, ScoreTopK)


@pytest.mark.parametrize("tail,pool_call", [
    (lambda relu, bn_out, conv_out: F.max_pool2d(relu, 2) + relu[..., ::2, ::2], F.max_pool2d),  # relu out used twice
    (lambda relu, bn_out, conv_out: F.max_pool2d(relu, 2, ceil_mode=True), F.max_pool2d),
    (lambda relu, bn_out, conv_out: torch.max_pool2d(relu, 3), torch.max_pool2d),
])
def test_a_pool_that_cannot_be_absorbed_stays_after_an_unpooled_block(tail, pool_call):
    fused = _fused_and_close(ConvBNReLU(tail), _image(size=9))
    assert [block.pool for block in _called(fused, SNetBlock)] == [False]
    assert len(_calls(fused, pool_call)) == 1


def test_blocks_outside_a_sequential_get_a_new_name_and_their_modules():
    model = ConvBNReLU(_pooled, bn=nn.BatchNorm2d(4, eps=1e-3, momentum=None))
    fused = _fused_and_close(model, _image(size=9))
    block = fused.conv_fused
    assert isinstance(block, SNetBlock) and block.pool
    assert not hasattr(fused, "conv") and not hasattr(fused, "bn")
    assert torch.equal(block.conv.bias, model.conv.bias) and block.bn.eps == 1e-3 and block.bn.momentum is None
    renamed = [key.replace("conv.", "conv_fused.0.").replace("bn.", "conv_fused.1.") for key in model.state_dict()]
    assert list(fused.state_dict()) == renamed


def test_bias_free_conv_block_is_fused():
    model = nn.Sequential(nn.Conv2d(3, 4, 2, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)).eval()
    model[1].running_mean.normal_()
    fused = fuse(model, backend="triton")
    assert sum(isinstance(m, SNetBlock) for m in fused.modules()) == 1
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert_module_as_accurate(fused(x), model, x, "output", norm=True)
