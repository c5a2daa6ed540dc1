"""`lfm eval` as detection researchers run it: metrics checked against scikit-learn, robustness sweeps,
center crops, a threshold calibrated on a validation set, the benchmarks' layouts, and refusals."""
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scipy.ndimage import gaussian_filter
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score
from tiny_data import fake_image, real_image, write_labeled
from utils import NETWORK_FLOOR, assert_as_accurate, float64_truth

from lfm import LFM
from lfm.cli import main
from lfm.evaluate import evaluate, plot_comparison
from lfm.images import EvalTransform, downscale_upscale, gaussian_blur
from lfm.metrics import best_threshold, binary_metrics
from lfm.perturb import Perturbation, parse_augmentation, parse_sweeps

SIZE = 64


@pytest.fixture(scope="module")
def test_sets(tmp_path_factory):
    """A CNNDetection test root with two subsets and a validation root, 64x64 PNGs."""
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(5)
    write_labeled(root / "test" / "gan_a", 3, 4, rng, size=SIZE)
    write_labeled(root / "test" / "gan_b", 4, 3, rng, size=SIZE)
    write_labeled(root / "val", 4, 4, rng, size=SIZE)
    return root


@pytest.fixture(scope="module")
def model(weights):
    net = LFM().eval()
    net.load_state_dict(load_file(str(weights)))
    return net


def _probs(model, paths, transform):
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        return torch.sigmoid(model(x)).squeeze(1).double().numpy()


def _assert_probs_as_accurate(probs, model, paths, transform):
    """Probabilities that eval wrote and the model's, computed here in float32, each against the model in
    float64 on the same preprocessed images."""
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        truth = torch.sigmoid(float64_truth(model, x)).squeeze(1)
    assert_as_accurate(torch.tensor(probs, dtype=torch.float64), torch.from_numpy(_probs(model, paths, transform)),
                       truth, "probabilities", floor=NETWORK_FLOOR)


def _predictions(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _labels(paths):
    return np.array([1 if "1_fake" in str(p) else 0 for p in paths])


# ---------------------------------------------------------------------------------------------
# Perturbations
# ---------------------------------------------------------------------------------------------
def test_perturbations_are_what_the_benchmarks_apply():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    img = Image.fromarray(array)
    for sigma in (0.5, 1.0, 2.0, 3.0):
        # scipy's gaussian_filter per channel in float64 (what CNNDetection's blur computes), rounded.
        expected = np.stack([gaussian_filter(array[..., c].astype(np.float64), sigma) for c in range(3)], axis=-1)
        assert np.array_equal(np.asarray(Perturbation("blur", sigma)(img)), np.clip(np.rint(expected), 0, 255))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=75)
    assert np.array_equal(np.asarray(Perturbation("jpeg", 75)(img)), np.asarray(Image.open(buffer).convert("RGB")))
    half = img.resize((25, 18), Image.BILINEAR).resize((50, 37), Image.BILINEAR)  # round(37 * .5) = 18
    assert np.array_equal(np.asarray(Perturbation("resize", 0.5)(img)), np.asarray(half))
    assert np.array_equal(np.asarray(Perturbation("crop", 30)(img)), array[4:34, 10:40])
    assert Perturbation("resize", 1.0)(img).size == img.size and downscale_upscale(img, 0.01).size == img.size
    assert gaussian_blur(img, 0) is img


def test_sweep_and_augmentation_strings():
    assert [p.name for p in parse_sweeps(["jpeg:95,75,50", "blur:1,2.5", "JPG:30", "resize:0.5", "crop:224"])] == [
        "jpeg:95", "jpeg:75", "jpeg:50", "blur:1", "blur:2.5", "jpeg:30", "resize:0.5", "crop:224"]
    assert parse_augmentation("blur:0.1,jpg:0.2") == {"blur_prob": 0.1, "jpeg_prob": 0.2}


@pytest.mark.parametrize("spec, message", [
    ("jpeg:0", "jpeg takes an integer quality in [1, 100], got '0'"),
    ("jpeg:101", "got '101'"),
    ("jpeg:high", "got 'high'"),
    ("jpeg:95,", "got ''"),
    ("blur:-1", "blur takes a sigma > 0 in pixels, got '-1'"),
    ("blur:nan", "got 'nan'"),
    ("resize:1.5", "resize takes a scale in (0, 1], got '1.5'"),
    ("crop:0", "crop takes a size >= 1"),
    ("noise:1", "unknown kind 'noise'; expected one of jpeg, blur, resize, crop"),
    ("jpeg", "expected KIND:S1[,S2...]"),
])
def test_bad_perturbation_strings_end_in_one_line_before_work(spec, message, weights, test_sets, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--weights", str(weights), "--data", str(test_sets / "test"), "--out", str(out),
                 "--perturb", "jpeg:90", "--perturb", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lfm eval: error: --perturb '{spec}': ") and message in err and err.count("\n") == 1
    assert not out.exists()  # refused before any work


def test_a_severity_given_twice_is_refused(weights, test_sets, tmp_path, capsys):
    assert main(["eval", "--weights", str(weights), "--data", str(test_sets / "test"), "--out", str(tmp_path / "o"),
                 "--perturb", "jpeg:90,80", "--perturb", "jpg:80"]) == 2
    assert "--perturb: jpeg:80 is given twice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A sweep, calibration and the metrics, end to end
# ---------------------------------------------------------------------------------------------
def test_sweep_with_calibration_from_the_command_line(weights, model, test_sets, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--weights", str(weights), "--data", str(test_sets / "test"), "--out", str(out),
                 "--no-resize", "--workers", "0", "--perturb", "jpeg:90,50", "--perturb", "blur:1",
                 "--perturb", "resize:0.5", "--perturb", "crop:56", "--calibrate-on", str(test_sets / "val")]) == 0
    printed = capsys.readouterr().out
    conditions = ["none", "jpeg:90", "jpeg:50", "blur:1", "resize:0.5", "crop:56"]
    assert [line.split()[0] for line in printed.splitlines() if line.split()[:1] and line.split()[0] in conditions
            ] == conditions  # the sweep table: a row per severity

    # The threshold: the best one on the validation images, scored independently.
    val_paths = sorted((test_sets / "val").rglob("*.png"))
    val_probs = _probs(model, val_paths, EvalTransform(None))
    threshold = best_threshold(_labels(val_paths), val_probs)[1]
    report = json.loads((out / "results.json").read_text())
    assert report["calibration"]["threshold"] == pytest.approx(threshold, rel=1e-5)
    assert report["calibration"]["n"] == 8

    rows = _predictions(out / "predictions.csv")
    results = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [(r["perturbation"], r["subset"]) for r in results] == [
        (c, s) for c in conditions for s in ("gan_a", "gan_b", "mean")]
    for condition in conditions:
        perturbation = None if condition == "none" else parse_sweeps([condition])[0]
        for subset in ("gan_a", "gan_b"):
            mine = [r for r in rows if r["perturbation"] == condition and r["subset"] == subset]
            paths = [r["path"] for r in mine]
            probs = np.array([float(r["prob_fake"]) for r in mine])
            labels = np.array([int(r["label"]) for r in mine])
            assert labels.tolist() == _labels(paths).tolist()
            # Perturbed before preprocessing, deterministic: the model on the perturbed image, computed here.
            _assert_probs_as_accurate(probs, model, paths, EvalTransform(None, None, perturbation))
            got = (report["subsets"] if condition == "none" else report["perturbations"][condition]["subsets"])[subset]
            # The reported metrics are those of the reported probabilities, checked against scikit-learn.
            assert abs(got["ap"] - average_precision_score(labels, probs)) <= 1e-9
            assert abs(got["auc"] - roc_auc_score(labels, probs)) <= 1e-9
            assert abs(got["acc"] - accuracy_score(labels, probs > 0.5)) <= 1e-9
            assert abs(got["cal_acc"] - accuracy_score(labels, probs > report["calibration"]["threshold"])) <= 1e-9
            row = next(r for r in results if r["perturbation"] == condition and r["subset"] == subset)
            assert float(row["auc"]) == got["auc"] and float(row["cal_acc"]) == got["cal_acc"]
            expected = binary_metrics(labels, probs)
            assert {key: got[key] for key in expected} == pytest.approx(expected, abs=1e-9, nan_ok=True)
    png = b"\x89PNG\r\n\x1a\n"
    assert (out / "robustness.png").read_bytes()[:8] == png
    # Runs compared in one plot from their results.json (read back: missing metrics are null there).
    report["mean"]["auc"] = None
    plot_comparison({"one": report, "two": report}, tmp_path / "compared.png")
    assert (tmp_path / "compared.png").read_bytes()[:8] == png


def test_center_crop_as_the_benchmarks_test(weights, model, test_sets, tmp_path, capsys):
    report = evaluate(weights, [test_sets / "test" / "gan_a"], resize=None, center_crop=48, workers=0,
                      out=tmp_path / "out", log=lambda *a: None)
    rows = _predictions(tmp_path / "out" / "predictions.csv")
    paths = [r["path"] for r in rows]
    _assert_probs_as_accurate([float(r["prob_fake"]) for r in rows], model, paths, EvalTransform(None, 48))
    assert report["center_crop"] == 48 and report["perturbations"] == {}
    assert main(["eval", "--weights", str(weights), "--data", str(test_sets / "test"), "--center-crop", "300",
                 "--out", str(tmp_path / "big")]) == 2
    assert "--center-crop 300 is larger than the 256x256 resize" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


def test_calibration_needs_both_classes(weights, test_sets, tmp_path, capsys):
    assert main(["eval", "--weights", str(weights), "--data", str(test_sets / "test"), "--out", str(tmp_path / "o"),
                 "--calibrate-on", str(test_sets / "test" / "gan_a" / "1_fake")]) == 2
    assert "fits none of the layouts tried" in capsys.readouterr().err
    only_real = tmp_path / "only_real"
    write_labeled(only_real, 2, 0, np.random.default_rng(0))
    assert main(["eval", "--weights", str(weights), "--data", str(test_sets / "test"), "--out", str(tmp_path / "o"),
                 "--calibrate-on", str(only_real)]) == 2
    assert "a threshold needs real and fake images; it holds only real ones" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Layouts from the command line
# ---------------------------------------------------------------------------------------------
def _write_genimage(root, rng):
    for generator, (n_real, n_fake) in (("midjourney", (2, 3)), ("sdv4/imagenet_ai_0419_sdv4", (3, 2))):
        for split in ("train", "val"):
            for name, n, make in (("nature", n_real, real_image), ("ai", n_fake, fake_image)):
                folder = root / generator / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    Image.fromarray(make(rng, SIZE)).save(folder / f"{i}.png")


def test_genimage_and_csv_layouts_from_the_command_line(weights, model, test_sets, tmp_path, capsys):
    rng = np.random.default_rng(1)
    _write_genimage(tmp_path / "GenImage", rng)
    out = tmp_path / "genimage"
    assert main(["eval", "--weights", str(weights), "--data", str(tmp_path / "GenImage"), "--out", str(out),
                 "--no-resize", "--workers", "0", "--subset-depth", "1"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert {name: (row["n_real"], row["n_fake"]) for name, row in report["subsets"].items()} == {
        "midjourney": (2, 3), "sdv4": (3, 2)}  # the val split only
    rows = _predictions(out / "predictions.csv")
    assert all("/val/" in r["path"] and int(r["label"]) == ("/ai/" in r["path"]) for r in rows)

    # A CSV list: relative paths from its folder, an optional subset column, labels 0/1 or real/fake.
    files = sorted((test_sets / "test").rglob("*.png"))
    listing = tmp_path / "list.csv"
    listing.write_text("path,label,subset\n" + "".join(
        f"{f},{'fake' if '1_fake' in str(f) else 0},{'x' if i % 2 else 'y'}\n" for i, f in enumerate(files)))
    out = tmp_path / "csv"
    assert main(["eval", "--weights", str(weights), "--data", str(listing), "--out", str(out), "--no-resize",
                 "--workers", "0"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert sorted(report["subsets"]) == ["x", "y"] and sum(r["n"] for r in report["subsets"].values()) == len(files)
    for subset in ("x", "y"):
        mine = [f for i, f in enumerate(files) if (i % 2) == (subset == "x")]
        probs = _probs(model, mine, EvalTransform(None))
        assert abs(report["subsets"][subset]["auc"] - roc_auc_score(_labels(mine), probs)) <= 1e-6
    capsys.readouterr()


def test_a_folder_fitting_no_layout_is_refused_naming_the_layouts(weights, tmp_path, capsys):
    plain = tmp_path / "plain"
    (plain / "pictures").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(plain / "pictures" / "x.png")
    assert main(["eval", "--weights", str(weights), "--data", str(plain), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == (f"lfm eval: error: {plain} fits none of the layouts tried: cnndetection "
                   "(<subset>/[<class>/]{0_real,1_fake}), genimage (<generator>/val/{ai,nature}), csv (a .csv file "
                   "of path,label[,subset])\n")
    assert main(["eval", "--weights", str(weights), "--data", str(plain), "--layout", "genimage"]) == 2
    assert "fits none of the layouts tried: genimage (<generator>/val/{ai,nature})\n" in capsys.readouterr().err
    assert main(["eval", "--weights", str(weights), "--data", str(plain), "--layout", "imagenet"]) == 2
    assert "argument --layout: invalid choice: 'imagenet'" in capsys.readouterr().err


def test_a_crop_larger_than_the_images_skips_them_with_the_reason(weights, test_sets, tmp_path, capsys):
    report = evaluate(weights, [test_sets / "test" / "gan_a"], resize=None, perturbations=["crop:100,48"], workers=0,
                      out=tmp_path / "out", log=lambda *a: None)
    err = capsys.readouterr().err
    assert "under crop:100, skipped 7 file(s)" in err and "64x64 is smaller than the crop size 100" in err
    assert "crop:48" not in err
    assert report["perturbations"]["crop:100"]["subsets"]["gan_a"]["n"] == 0
    assert report["perturbations"]["crop:48"]["subsets"]["gan_a"]["n"] == report["subsets"]["gan_a"]["n"] == 7
