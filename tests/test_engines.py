"""Engines of eval and predict (torch, compile, onnx) and `lfm export`: each as accurate as the torch backend,
against the float64 truth."""
import contextlib
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from utils import NETWORK_FLOOR, assert_as_accurate, assert_authors_logits, assert_module_as_accurate

from lfm import LFM, engines
from lfm.cli import main
from lfm.engines import OnnxRunner, cxx_compiler, export_model, prepare, weights_hash
from lfm.errors import UsageError
from lfm.weights import save_weights


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LFM(backend="torch").eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("weights") / "lfm.safetensors"
    save_weights(model, path, {"model": "lfm", "k": 16})
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _images(folder, n=3, size=(64, 64)):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _probs(text):
    return [float(line.split("\t")[1]) for line in text.splitlines()]


def test_weights_hash_follows_every_value(model):
    before = weights_hash(model)
    changed = LFM(backend="torch")
    changed.load_state_dict(model.state_dict())
    assert weights_hash(changed) == before
    with torch.no_grad():
        changed.cnn.layer3.bn.running_mean[5] += 1e-6
    assert weights_hash(changed) != before


def test_pt2_export_gives_the_same_logits_at_any_batch(model, tmp_path):
    path = export_model(model, tmp_path / "m.pt2", "pt2", (65, 71))
    program = torch.export.load(path).module()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 65, 71)
        with torch.no_grad():
            assert_module_as_accurate(program(x), model, x, floor=NETWORK_FLOOR)


@pytest.mark.slow
@pytest.mark.skipif(cxx_compiler() is None, reason="AOTInductor needs a C++ compiler")
def test_aoti_package_gives_the_same_logits_at_any_batch(model, tmp_path):
    path = export_model(model, tmp_path / "m.pt2", "aoti", (65, 71))
    package = torch._inductor.aoti_load_package(str(path))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 65, 71)
        with torch.no_grad():
            assert_module_as_accurate(package(x), model, x, floor=NETWORK_FLOOR)


def test_aoti_export_without_a_compiler_says_so(model, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(UsageError, match="--format aoti compiles C.. and no compiler was found"):
        export_model(model, tmp_path / "m.pt2", "aoti", (64, 64))
    assert not list(tmp_path.iterdir())


def test_onnx_engine_exports_once_and_matches_the_authors(official, authors_logits, cache):
    pytest.importorskip("onnxruntime")
    model = LFM(backend="torch").eval()
    model.load_state_dict(official["state_dict"], strict=True)
    runner = OnnxRunner(model, (256, 256))
    ref = official["outputs"]
    assert_authors_logits(runner(ref["x256"]), authors_logits, "x256")
    assert_authors_logits(runner(ref["x256"][:1]), authors_logits, "x256", rows=slice(1))
    assert [p.name for p in (cache / "onnx").iterdir()] == [runner.path.name]
    stamp = runner.path.stat().st_mtime_ns
    assert OnnxRunner(model, (256, 256)).path.stat().st_mtime_ns == stamp  # cached, not exported again
    with pytest.raises(ValueError, match="takes 256x256 inputs, got 224x224"):
        runner(ref["x224"])
    broken = ref["x256"][:1].clone()
    broken[0, 0, 100, 100] = float("nan")  # one NaN pixel: ONNX Runtime's fused conv, ReLU and MaxPool keep it
    assert runner(broken).isnan().all()


def test_predict_engines_agree(weights, tmp_path, cache, capsys):
    pytest.importorskip("onnxruntime")
    folder = _images(tmp_path / "images")
    probs = {}
    for engine, precision in (("onnx", "float32"), ("torch", "float32"), ("torch", "float64")):
        assert main(["predict", "--weights", str(weights), str(folder), "--workers", "0", "--engine", engine,
                     "--precision", precision, "--json"]) == 0
        probs[engine, precision] = torch.tensor([json.loads(line)["prob_fake"]
                                                 for line in capsys.readouterr().out.splitlines()], dtype=torch.float64)
    assert len(probs["torch", "float64"]) == 3
    assert_as_accurate(*probs.values(), "probabilities of onnx", floor=NETWORK_FLOOR)


def test_chunked_calls_give_the_whole_batch_logits(model, monkeypatch):
    monkeypatch.setattr(engines, "CALL_BYTES", 64 * 46 * 46 * 4 * 2)  # two 47x47 images per call
    x = torch.randn(5, 3, 47, 47)
    calls = []
    chunked = engines.Chunked(lambda part: calls.append(len(part)) or model(part))
    with torch.no_grad():
        assert_module_as_accurate(chunked(x), model, x, floor=NETWORK_FLOOR)
    assert calls == [2, 2, 1]
    assert engines.images_per_call(torch.zeros(1, 3, 256, 256)) == 1  # 16.6 MB of first map per image


@pytest.mark.skipif(cxx_compiler() is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compile_engine_matches_torch(model):
    compiled = prepare(model, "compile", torch.device("cpu"), (47, 47), "predict")
    x = torch.randn(2, 3, 47, 47)
    with torch.no_grad():
        assert_module_as_accurate(compiled(x), model, x, floor=NETWORK_FLOOR)


def test_compile_engine_without_a_compiler_runs_torch_with_one_warning(model, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert prepare(model, "compile", torch.device("cpu"), (256, 256), "predict") is model
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "needs a C++ compiler" in err[0] and "--engine torch" in err[0]


def test_onnx_engine_without_onnxruntime_says_how_to_install(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    folder = _images(tmp_path / "images", n=1)
    assert main(["predict", "--weights", str(weights), str(folder), "--engine", "onnx"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["lfm predict: error: --engine onnx needs ONNX Runtime: pip install 'lfm[cpu]'"]


@pytest.mark.parametrize("argv,message", [
    (["--engine", "onnx", "--no-resize"], "--engine onnx runs a graph exported for one input size"),
    (["--engine", "onnx", "--precision", "bf16"], "--engine onnx computes in float32"),
    (["--engine", "tensorrt"], "invalid choice: 'tensorrt'"),
])
def test_bad_engine_choices_exit_2_with_one_line(weights, tmp_path, capsys, argv, message):
    if "onnx" in argv:
        pytest.importorskip("onnxruntime")
    folder = _images(tmp_path / "images", n=1)
    assert main(["predict", "--weights", str(weights), str(folder), *argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0]


def test_export_command(weights, tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert main(["export", "--weights", str(weights), "--format", "pt2", "--size", "64", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert torch.export.load(out).module()(torch.zeros(1, 3, 64, 64)).shape == (1, 1)
    for argv, message in [
        (["--format", "pt2", str(tmp_path / "missing" / "m.pt2")], "OUT must be a file in an existing folder"),
        (["--format", "pt2", "--size", "20", str(out)], "--size 20: input 20x20 leaves 0x0 positions"),
        (["--format", "tflite", str(out)], "invalid choice: 'tflite'"),
    ]:
        assert main(["export", "--weights", str(weights), *argv]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and message in err[0], err


def test_unknown_engine_in_the_api(weights, tmp_path):
    from lfm.predict import predict

    with pytest.raises(UsageError, match="--engine must be one of torch, compile, onnx, got 'fast'"):
        predict(weights, [str(tmp_path)], engine="fast")


@pytest.mark.parametrize("backend,derive", [("triton", "lfm_kernels.conv2x2._pack"),
                                            ("torch", "lfm_kernels.snet_block_torch.fold_batchnorm")])
def test_frozen_weights_derive_each_weight_once(backend, derive, monkeypatch):
    """What a CUDA graph's capture runs under (engines.capture_cuda_graph): inside frozen_weights the ops'
    derived weights (packed for our GEMMs, BatchNorm folded for the cuDNN composition) are computed by the
    first forward and reused by the next, so a graph replays no weight preprocessing; outside, every
    forward derives them again. The logits are the same either way."""
    import importlib

    from lfm_kernels.frozen import frozen_weights

    module_name, name = derive.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *args: calls.append(name) or real(*args))
    torch.manual_seed(0)
    model, x = LFM(backend=backend).eval(), torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want = model(x)
        per_forward = len(calls)
        assert per_forward == 4  # blocks 2-4 and the scoring packed, or blocks 1-4 folded
        weights = {}
        with frozen_weights(weights):
            first, second = model(x), model(x)
        assert len(calls) == 2 * per_forward and len(weights) == per_forward  # the second forward derived nothing
        assert torch.equal(first, want) and torch.equal(second, want)
        model(x)
        assert len(calls) == 3 * per_forward  # outside, derived on every call again


class FakeCudaGraphs:
    """torch.cuda's stream and graph API as no-ops on CPU, recording what runs while a graph captures."""

    def __init__(self, monkeypatch, record):
        self.capturing = False
        fake = self

        class Graph:
            def replay(self):
                record.append("replay")

        @contextlib.contextmanager
        def graph(g):
            fake.capturing = True
            yield
            fake.capturing = False

        stream = types.SimpleNamespace(wait_stream=lambda other: None)
        monkeypatch.setattr(torch.cuda, "Stream", lambda *args: stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)


def test_cuda_graph_runner_captures_no_weight_derivation(monkeypatch):
    """CudaGraphRunner's capture with torch.cuda's graph API faked on CPU: the warm-up derives the packed
    weights, the captured forward derives none (a replay runs no weight copy), and replays give the logits."""
    from lfm_kernels import conv2x2

    record = []
    fake = FakeCudaGraphs(monkeypatch, record)
    real = conv2x2._pack
    monkeypatch.setattr(conv2x2, "_pack", lambda *args: record.append("capture" if fake.capturing else "warm-up")
                        or real(*args))
    torch.manual_seed(0)
    model, x = LFM(backend="triton").eval(), torch.randn(1, 3, 48, 48)
    runner = engines.CudaGraphRunner(model)
    with torch.no_grad():
        want = model(x)
        record.clear()
        got = runner(x)
        assert runner(x).equal(got)
    assert record == ["warm-up"] * 4 + ["replay"] * 2  # 4 weights packed once; the capture packed nothing
    assert got.equal(want)
