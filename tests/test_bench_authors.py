"""The eager baseline of the benchmarks (bench/authors.py) computes what the authors' code computes."""
import torch

from bench.authors import AuthorsLFM
from bench.providers import build_model


def test_authors_baseline_loads_the_checkpoint_and_gives_the_authors_logits(official):
    model = AuthorsLFM().eval()
    model.load_state_dict(official["state_dict"], strict=True)
    ref = official["outputs"]
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x256"]), ref["logits256"], atol=1e-4, rtol=0)
        torch.testing.assert_close(model(ref["x224"]), ref["logits224"], atol=1e-4, rtol=0)


def test_providers_share_weights_and_agree():
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = build_model("eager")(x)
        torch.testing.assert_close(build_model("torch")(x), eager, atol=1e-4, rtol=0)


def test_released_dropout_in_training_drops_about_a_tenth():
    torch.manual_seed(0)
    model = AuthorsLFM().train()
    captured = {}
    model.fc1.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
    model(torch.randn(8, 3, 48, 48))
    dropped = (captured["x"] == 0).float().mean().item()
    assert 0.07 < dropped < 0.13  # 8 * 1024 values, p = 0.1: sigma about 0.003
