import pytest
import torch
from utils import binomial_sigmas

from lfm import LFM, min_input_size, snet_output_size
from lfm_kernels.backend import resolve_backend


def _loaded(official, **kwargs):
    model = LFM(**kwargs).eval()
    model.load_state_dict(official["state_dict"], strict=True)
    return model


def test_state_dict_matches_checkpoint(official):
    model = LFM()
    ours = model.state_dict()
    theirs = official["state_dict"]
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    # The residual is computed by the op; the frozen convs we keep equal the authors' values.
    for name in ("downsample_conv.weight", "upsample_conv.weight"):
        assert torch.equal(ours[name], theirs[name])


def test_parity_with_authors_outputs(official):
    ref = official["outputs"]
    model = _loaded(official, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x256"]), ref["logits256"], atol=1e-4, rtol=0)
        torch.testing.assert_close(model(ref["x224"]), ref["logits224"], atol=1e-4, rtol=0)
        from lfm_kernels import npr_residual, topk_pool

        residual = npr_residual(ref["x256"], backend="torch")
        torch.testing.assert_close(residual, ref["npr256"], atol=1e-4, rtol=0)
        maps = model.covn1_1(model.features(ref["x256"]))
        torch.testing.assert_close(maps, ref["maps256"], atol=1e-4, rtol=0)
        torch.testing.assert_close(topk_pool(maps, 16, backend="torch"), ref["topk256"], atol=1e-4, rtol=0)


def test_triton_backend_parity_with_authors_outputs(official):
    ref = official["outputs"]
    model = _loaded(official, backend="triton")
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x224"]), ref["logits224"], atol=1e-4, rtol=0)


def test_triton_backend_gradients_match_torch_in_a_training_step():
    torch.manual_seed(0)
    torch_model = LFM(dropout="off", backend="torch").train()
    triton_model = LFM(dropout="off", backend="triton").train()
    triton_model.load_state_dict(torch_model.state_dict())
    x = torch.randn(2, 3, 50, 53)
    y = torch.tensor([[1.0], [0.0]])
    grads = []
    for model in (torch_model, triton_model):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("size", [(47, 47), (48, 61), (65, 64), (101, 99), (224, 225)])
def test_any_size_at_or_above_minimum_runs(size):
    model = LFM().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 1) and torch.isfinite(out).all()


def test_even_size_matches_authors_residual_exactly_on_odd_neighbours(official):
    # Cropping an even image by one row/col must not change the positions the residual anchors to.
    x = official["outputs"]["x256"][:1]
    from lfm_kernels import npr_residual

    assert torch.equal(npr_residual(x[..., :255, :255], backend="torch"), npr_residual(x, backend="torch")[..., :255, :255])


def test_too_small_input_names_the_minimum():
    assert min_input_size(16) == 47
    assert snet_output_size(47, 47) == (4, 4)
    with pytest.raises(ValueError, match="47x47"):
        LFM()(torch.randn(1, 3, 46, 46))
    with pytest.raises(ValueError, match="47x47"):
        LFM()(torch.randn(1, 3, 47, 30))
    assert LFM(k=1).min_size == 23 and snet_output_size(23, 23) == (1, 1)


@pytest.mark.parametrize("x,match", [
    (torch.randn(3, 64, 64), r"\(3, 64, 64\)"),
    (torch.randn(1, 1, 64, 64), r"\(1, 1, 64, 64\)"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "torch.uint8"),
    ([[1.0]], "list"),
])
def test_bad_batches(x, match):
    with pytest.raises(ValueError, match=match):
        LFM()(x)


@pytest.mark.parametrize("kwargs,match", [(dict(k=0), "k must"), (dict(dropout="sometimes"), "dropout"),
                                          (dict(pmin=0.4, pmax=0.2), "pmin"), (dict(backend="cuda"), "backend"),
                                          (dict(random_k_weight=-1.0), "random_k_weight")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LFM(**kwargs)


@pytest.mark.parametrize("mode,expected", [("paper", (0.1, 0.3)), ("released", (0.1, 0.1)), ("off", None)])
def test_dropout_modes(mode, expected):
    assert LFM(dropout=mode).drop == expected


def test_paper_dropout_rates_per_rank_inside_the_model():
    # With all-equal head weights, dropping ranks changes the logit; count zeros in the Top-K input.
    torch.manual_seed(0)
    model = LFM(dropout="paper").train()
    captured = {}
    model.fc1.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
    model(torch.randn(8, 3, 48, 48))
    values = captured["x"].view(8, 64, 16)
    dropped = (values == 0).flatten(0, 1).sum(0)
    probs = torch.linspace(0.3, 0.1, 16)
    n = 8 * 64
    # Top-K values after ReLU features can be exactly 0 only by dropout (scores are generic reals).
    for rank in (0, 15):
        assert binomial_sigmas(dropped[rank].item(), n, probs[rank].item()) < 5


def test_random_k_auxiliary_logits_only_in_training():
    model = LFM(random_k_weight=0.02).train()
    logits, aux = model(torch.randn(2, 3, 48, 48), return_aux=True)
    assert logits.shape == aux.shape == (2, 1)
    (logits.sum() + aux.sum()).backward()
    model.eval()
    _, aux = model(torch.randn(2, 3, 48, 48), return_aux=True)
    assert aux is None
    assert LFM().train()(torch.randn(1, 3, 48, 48), return_aux=True)[1] is None


def test_backend_switch(monkeypatch):
    cpu = torch.zeros(1)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("LFM_BACKEND", "triton")
    assert resolve_backend(None, cpu) == "triton"  # TRITON_INTERPRET=1 in the tests
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend(None, cpu)
    monkeypatch.setenv("LFM_BACKEND", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        resolve_backend(None, cpu)
