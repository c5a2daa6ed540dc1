import pytest
import torch
from utils import (
    NETWORK_FLOOR,
    assert_as_accurate,
    assert_authors_logits,
    assert_module_as_accurate,
    assert_training_step_as_accurate,
    authors_outputs,
    binomial_sigmas,
    training_step,
)

from bench.authors import AuthorsLFM
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


def test_parity_withauthors_outputs(official):
    """Ours (torch backend) and the authors' float32 outputs shipped with their checkpoint, each against the
    authors' code in float64."""
    ref = official["outputs"]
    model = _loaded(official, backend="torch")
    from lfm_kernels import npr_residual, topk_pool

    truth = authors_outputs(official["state_dict"], ref["x256"], torch.float64)
    truth224 = authors_outputs(official["state_dict"], ref["x224"], torch.float64)
    with torch.no_grad():
        assert_as_accurate(model(ref["x256"]), ref["logits256"], truth["logits"], "logits at 256")
        assert_as_accurate(model(ref["x224"]), ref["logits224"], truth224["logits"], "logits at 224")
        maps = model.covn1_1(model.features(ref["x256"]))
        ours = {"residual": npr_residual(ref["x256"], backend="torch"), "maps": maps,
                "topk": topk_pool(maps, 16, backend="torch")}
    for name, shipped in (("residual", ref["npr256"]), ("maps", ref["maps256"]), ("topk", ref["topk256"])):
        assert_as_accurate(ours[name], shipped, truth[name], name, norm=name != "residual")


def test_triton_backend_parity_withauthors_outputs(official, authors_logits):
    model = _loaded(official, backend="triton")
    with torch.no_grad():
        assert_authors_logits(model(authors_logits["x224"][0]), authors_logits, "x224")


@pytest.mark.slow  # a whole training step under the interpreter, in two dtypes
def test_triton_backend_gradients_in_a_training_step_are_as_accurate_as_the_authors():
    """A training step without dropout (the authors' code with p = 0) of the triton backend and of the authors'
    code in float32, each against the authors' code in float64."""
    torch.manual_seed(0)
    state_dict = LFM(k=4, dropout="off").state_dict()
    x = torch.randn(2, 3, 40, 42)  # even: the authors' residual needs whole 2x2 cells
    y = torch.tensor([[1.0], [0.0]])
    runs = {}
    for name, model, dtype in (("ours", LFM(k=4, dropout="off", backend="triton"), torch.float32),
                               ("authors", AuthorsLFM(k=4, pmin=0.0), torch.float32),
                               ("truth", AuthorsLFM(k=4, pmin=0.0), torch.float64)):
        model.load_state_dict(state_dict)
        runs[name] = training_step(model, x, y, dtype)
    assert_training_step_as_accurate(runs["ours"], runs["authors"], runs["truth"])


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

    assert torch.equal(npr_residual(x[..., :255, :255], backend="torch"),
                       npr_residual(x, backend="torch")[..., :255, :255])


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


def _update_conv_data(model):
    with torch.no_grad():
        model.cnn.layer2.conv.weight.data.copy_(torch.randn_like(model.cnn.layer2.conv.weight) * 0.1)
        model.cnn.layer4.bn.running_var.data.mul_(3.0)


def _fused_adam_step(model):
    # In eval mode (fine-tuning with frozen statistics): no buffer changes that could hide a stale cache.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)
    model(torch.randn(2, 3, 40, 40)).sum().backward()
    optimizer.step()


def _load_other_weights(model):
    model.load_state_dict(LFM(k=4).state_dict())


def _round_trip_dtype(model):
    model.to(torch.bfloat16).to(torch.float32)


def _plain_sgd_step(model):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(torch.randn(2, 3, 40, 40)).sum().backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("update", [_update_conv_data, _fused_adam_step, _load_other_weights, _round_trip_dtype,
                                    _plain_sgd_step])
def test_eval_is_never_stale_after_a_parameter_update(update):
    # Any legal update of parameters or buffers shows in the next eval call: nothing derived from
    # them (a folded BatchNorm, say) may be cached across calls. Fused Adam and .data writes do not
    # bump tensor versions, so a cache keyed on versions would miss them.
    torch.manual_seed(0)
    model = LFM(k=4, dropout="off", backend="triton", input_precision="ieee").eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        model(x)
    update(model)
    state_dict = model.state_dict()
    with torch.no_grad():
        assert_as_accurate(model(x), authors_outputs(state_dict, x, torch.float32, k=4)["logits"],
                           authors_outputs(state_dict, x, torch.float64, k=4)["logits"], "logits after the update")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inference_mode(backend):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 40)
    model = LFM(k=4, backend=backend).eval()
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():  # the same computation: the same bits
        assert torch.equal(model(x), expected)
        built_inside = LFM(k=4, backend=backend).eval()  # parameters are inference tensors
        built_inside.load_state_dict(model.state_dict())
        assert torch.equal(built_inside(x), expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_nan_pixel_gives_nan_logits_as_in_pytorch(backend):
    torch.manual_seed(0)
    model = LFM(k=4, backend=backend).eval()
    x = torch.randn(2, 3, 40, 40)
    x[1, 0, 5, 7] = float("nan")
    with torch.no_grad():
        logits = model(x)
    assert torch.isfinite(logits[0]).all() and torch.isnan(logits[1]).all()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_runs_on_the_tensors_gpu_not_the_current_one():
    torch.manual_seed(0)
    model = LFM(backend="triton").eval().to("cuda:1")
    reference = LFM(backend="torch").eval().to("cuda:1")
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64, device="cuda:1")
    with torch.cuda.device(0), torch.no_grad():
        assert_module_as_accurate(model(x), reference, x, floor=NETWORK_FLOOR)
