"""The eager baseline of the benchmarks (bench/authors.py) computes what the authors' code computes."""
import torch
from utils import NETWORK_FLOOR, assert_as_accurate, assert_module_as_accurate

from bench.authors import AuthorsLFM
from bench.providers import build_model


def test_authors_baseline_loads_the_checkpoint_and_gives_the_authors_logits(official, authors_logits):
    """The baseline against the authors' code in float64, as accurate as their float32 logits as shipped."""
    model = AuthorsLFM().eval()
    model.load_state_dict(official["state_dict"], strict=True)
    for size in ("x256", "x224"):
        x, _, truth = authors_logits[size]
        with torch.no_grad():
            assert_as_accurate(model(x), official["outputs"]["logits" + size[1:]], truth, f"logits at {size}",
                               floor=NETWORK_FLOOR)


def test_providers_share_weights_and_agree():
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_module_as_accurate(build_model("torch")(x), build_model("eager"), x, floor=NETWORK_FLOOR)


def test_released_dropout_in_training_drops_about_a_tenth():
    torch.manual_seed(0)
    model = AuthorsLFM().train()
    captured = {}
    model.fc1.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
    model(torch.randn(8, 3, 48, 48))
    dropped = (captured["x"] == 0).float().mean().item()
    assert 0.07 < dropped < 0.13  # 8 * 1024 values, p = 0.1: sigma about 0.003
