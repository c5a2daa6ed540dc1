"""`lfm predict` and `lfm eval`, heatmaps, and how the command line reports problems."""
import csv
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_data import real_image, write_labeled
from utils import NETWORK_FLOOR, assert_as_accurate, float64_truth

from lfm import LFM, NPR
from lfm.cli import build_parser, main
from lfm.heatmap import RECEPTIVE_FIELD, STRIDE, topk_heat
from lfm.images import EvalTransform
from lfm.metrics import binary_metrics
from lfm.train import TrainOptions
from lfm.weights import save_weights

REPO = Path(__file__).resolve().parents[1]



def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_predict_gives_the_authors_probabilities(official, tmp_path, capsys):
    reference = torch.load(official["dir"] / "reference_pipeline.pt", weights_only=True, map_location="cpu")
    for name, data in reference["pngs"].items():
        (tmp_path / name).write_bytes(data)
    results = {}
    for precision in ("float32", "float64"):
        assert main(["predict", "--weights", str(official["dir"] / "bs_model.pth"), str(tmp_path), "--json",
                     "--workers", "0", "--precision", precision]) == 0
        results[precision] = {Path(r["path"]).name: r["prob_fake"] for r in _json_lines(capsys.readouterr().out)}
    names = sorted(reference["prob_fake"])
    assert sorted(results["float32"]) == names
    modes = {name: Image.open(tmp_path / name).mode for name in names}
    assert {"RGB", "RGBA", "L"} <= set(modes.values())

    def logits(probs):  # where float32's error is absolute: a probability of 4e-18 moves by 1e-5 relatively
        return torch.tensor([math.log(probs[n]) - math.log1p(-probs[n]) for n in names], dtype=torch.float64)

    # The authors' float32 pipeline (as shipped) and ours, each against ours in float64: same preprocessing,
    # so theirs is off only by float32's rounding (measured 2.3e-7 of the largest logit, about 49).
    truth = logits(results["float64"])
    assert_as_accurate(logits(reference["prob_fake"]), None, truth, "the authors' logits", floor=NETWORK_FLOOR)
    assert_as_accurate(logits(results["float32"]), logits(reference["prob_fake"]), truth, "logits",
                       floor=NETWORK_FLOOR)


def test_predict_lines_json_globs_and_bad_files(weights, tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in (("a.png", (50, 70)), ("b.jpg", (64, 64)), ("c.bmp", (48, 90))):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("hello")
    (folder / "cut.png").write_bytes((folder / "a.png").read_bytes()[:100])

    assert main(["predict", "--weights", str(weights), str(folder), "--workers", "0", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    lines = [line.split("\t") for line in captured.out.splitlines()]
    assert [Path(path).name for path, _ in lines] == ["a.png", "b.jpg", "c.bmp"]
    assert all(0 <= float(prob) <= 1 for _, prob in lines)
    assert "lfm predict: warning: skipped 2 file(s)" in captured.err
    assert "notes.txt: not a readable image" in captured.err and "cut.png: cannot decode" in captured.err

    # A glob, JSON lines, the same probabilities; a pixel limit refuses the largest image.
    assert main(["predict", "--weights", str(weights), str(folder / "*.png"), str(folder / "b.jpg"), "--json",
                 "--workers", "0", "--max-pixels", "4000"]) == 0
    captured = capsys.readouterr()
    results = _json_lines(captured.out)
    assert [Path(r["path"]).name for r in results] == ["a.png", "b.jpg"][:1]  # b.jpg is 64x64 = 4096 pixels
    assert results[0]["prob_fake"] == pytest.approx(float(lines[0][1]), rel=1e-5)
    assert "b.jpg: refused: 64x64 = 4096 pixels is above the limit of 4000" in captured.err


def test_heatmaps_cover_the_topk_receptive_fields(weights, tmp_path, capsys):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "heat"
    assert main(["predict", "--weights", str(weights), str(tmp_path / "x.png"), "--heatmap", str(out), "--json",
                 "--workers", "0"]) == 0
    result = _json_lines(capsys.readouterr().out)[0]
    assert result["heatmap"] == str(out / "x.png")
    assert Image.open(out / "x.png").size == (120, 90) and Image.open(out / "x.png").mode == "RGB"

    model = LFM(k=16).eval()
    x = EvalTransform()(Image.open(tmp_path / "x.png").convert("RGB")).unsqueeze(0)
    heat = topk_heat(model, x)
    # At 256x256 every receptive field lies inside the image: each of the 64 * 16 picks adds a 23x23 box.
    assert heat.shape == (256, 256) and heat.sum() == 64 * 16 * RECEPTIVE_FIELD ** 2


def test_receptive_field_of_the_snet_grid():
    torch.manual_seed(0)
    model = LFM(backend="torch").eval()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    feats = model.features(x)
    for i, j in [(0, 0), (2, 3), (5, 5)]:
        (grad,) = torch.autograd.grad(feats[:, :, i, j].sum(), x, retain_graph=True)
        rows, cols = grad.abs().sum((0, 1)).nonzero().unbind(1)
        assert rows.min() == STRIDE * i and rows.max() == STRIDE * i + RECEPTIVE_FIELD - 1
        assert cols.min() == STRIDE * j and cols.max() == STRIDE * j + RECEPTIVE_FIELD - 1


def test_heatmap_needs_an_lfm_model(tmp_path, capsys):
    save_weights(NPR(), tmp_path / "npr.safetensors", {"model": "npr"})
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    assert main(["predict", "--weights", str(tmp_path / "npr.safetensors"), str(tmp_path / "x.png"),
                 "--heatmap", str(tmp_path / "h")]) == 2
    assert "a 'npr' model has none" in capsys.readouterr().err


def test_eval_table_files_and_consistency_with_predict(weights, tmp_path, capsys):
    rng = np.random.default_rng(2)
    write_labeled(tmp_path / "test" / "gan_a", 3, 4, rng)
    write_labeled(tmp_path / "test" / "gan_b", 5, 2, rng)
    out = tmp_path / "results"
    assert main(["eval", "--weights", str(weights), "--data", str(tmp_path / "test"), "--out", str(out),
                 "--no-resize", "--workers", "0"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["subset", "n", "acc", "ap", "auc", "eer", "real_acc", "fake_acc", "best_acc",
                                "best_threshold", "ece"]
    assert [line.split()[0] for line in table[2:4]] == ["gan_a", "gan_b"] and table[5].startswith("mean")

    report = json.loads((out / "results.json").read_text())
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0] == ("perturbation,subset,n,n_real,n_fake,acc,ap,auc,eer,real_acc,fake_acc,best_acc,"
                           "best_threshold,ece")
    assert len(csv_rows) == 4
    for subset in ("gan_a", "gan_b"):
        assert main(["predict", "--weights", str(weights), str(tmp_path / "test" / subset), "--json", "--no-resize",
                     "--workers", "0"]) == 0
        results = _json_lines(capsys.readouterr().out)
        labels = [1 if "1_fake" in r["path"] else 0 for r in results]
        expected = binary_metrics(labels, [r["prob_fake"] for r in results])
        assert report["subsets"][subset] == pytest.approx(expected)
    subsets = report["subsets"]
    assert report["mean"]["acc"] == pytest.approx((subsets["gan_a"]["acc"] + subsets["gan_b"]["acc"]) / 2)


def _predictions(path):
    with open(path, newline="") as f:
        return {row["path"]: float(row["prob_fake"]) for row in csv.DictReader(f)}


def test_eval_resizes_to_256_unless_told_not_to(weights, tmp_path):
    rng = np.random.default_rng(3)
    write_labeled(tmp_path / "set", 2, 2, rng, size=52)
    model = LFM().eval()
    model.load_state_dict(load_file(str(weights)))
    paths = sorted((tmp_path / "set").rglob("*.png"))
    for resize, extra in ((256, []), (None, ["--no-resize"])):
        out = tmp_path / f"r{resize}"
        assert main(["eval", "--weights", str(weights), "--data", str(tmp_path / "set"), "--out", str(out),
                     "--workers", "0", *extra]) == 0
        with torch.no_grad():
            x = torch.stack([EvalTransform(resize)(Image.open(p).convert("RGB")) for p in paths])
            expected = torch.sigmoid(model(x)).squeeze(1)
        predictions = _predictions(out / "predictions.csv")
        assert_as_accurate(torch.tensor([predictions[str(p)] for p in paths], dtype=torch.float64), expected,
                           torch.sigmoid(float64_truth(model, x)).squeeze(1), "probabilities", floor=NETWORK_FLOOR)
        assert json.loads((out / "results.json").read_text())["resize"] == resize


@pytest.mark.parametrize("argv, message", [
    (["eval", "--weights", "W", "--data", "MISSING"], "no such folder"),
    (["eval", "--weights", "W", "--data", "PLAIN"], "fits none of the layouts tried: cnndetection"),
    (["eval", "--weights", "MISSING.pth", "--data", "LABELED"], "no such weights file"),
    (["predict", "--weights", "W", "MISSING.png"], "no such file or folder"),
    (["predict", "--weights", "W", "EMPTY"], "no files to score"),
])
def test_input_problems_exit_2_with_a_message(argv, message, weights, tmp_path, capsys):
    (tmp_path / "plain" / "pictures").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    write_labeled(tmp_path / "labeled", 1, 1, np.random.default_rng(0))
    names = {"W": str(weights), "MISSING": str(tmp_path / "missing"), "PLAIN": str(tmp_path / "plain"),
             "EMPTY": str(tmp_path / "empty"), "LABELED": str(tmp_path / "labeled"),
             "MISSING.pth": str(tmp_path / "missing.pth"), "MISSING.png": str(tmp_path / "missing.png")}
    assert main([names.get(arg, arg) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lfm {argv[0]}: error: ") and message in err and "Traceback" not in err


def test_unexpected_errors_are_one_line(monkeypatch, weights, tmp_path, capsys):
    import lfm.predict

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(lfm.predict, "scored_in_order", boom)
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    assert main(["predict", "--weights", str(weights), str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err == "lfm predict: error: RuntimeError: boom (LFM_DEBUG=1 shows the traceback)\n"


@pytest.mark.slow  # a fresh interpreter importing torch
def test_python_dash_m_lfm_runs(weights, tmp_path):
    Image.fromarray(real_image(np.random.default_rng(0), 64)).save(tmp_path / "x.png")
    done = subprocess.run([sys.executable, "-m", "lfm", "predict", "--weights", str(weights), str(tmp_path / "x.png"),
                           "--workers", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    path, prob = done.stdout.strip().split("\t")
    assert path == str(tmp_path / "x.png") and 0 <= float(prob) <= 1
    bad = subprocess.run([sys.executable, "-m", "lfm", "eval", "--weights", str(weights),
                          "--data", str(tmp_path / "no")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("lfm eval: error: no such folder")


def test_train_command_line_sets_every_option_and_states_its_default():
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    options = {action.dest: action for action in train_parser._actions}
    for field in dataclasses.fields(TrainOptions):
        assert field.name in options, field.name
        if "{default}" in field.metadata.get("help", ""):
            assert "{" not in options[field.name].help and "(" in options[field.name].help, field.name
    args = build_parser().parse_args(["train", "--data", "d", "--betas", "0.5,0.6", "--resize", "0", "--no-flip",
                                      "--jpeg-quality", "40,90", "--classes", "car,cat"])
    assert (args.betas, args.resize, args.flip, args.jpeg_quality, args.classes) == (
        (0.5, 0.6), None, False, (40, 90), ["car", "cat"])
    assert "lr" not in args  # defaults stay in TrainOptions, so a resumed run tells overrides from saved options

