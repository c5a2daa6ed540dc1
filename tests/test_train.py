"""`lfm train`: the run folder, exact resume, early stopping, the three models, bad files."""
import csv
import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_data import write_training_set

from lfm import LFM, LFMGAP, NPR
from lfm.cli import main
from lfm.weights import load_model

# Everything random is on: crops, flips, blur, JPEG, the paper's rank dropout and random-K sampling.
RANDOM_RECIPE = ["--classes", "car", "--resize", "56", "--crop", "48", "--batch-size", "8", "--workers", "0",
                 "--lr", "1e-3", "--dropout", "paper", "--random-k-weight", "0.02", "--jpeg-prob", "0.5",
                 "--blur-prob", "0.5", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_training_set(tmp_path_factory.mktemp("tiny"))


def _train(*args):
    return main(["train", *map(str, args)])


def _log_rows(run):
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_resume_continues_bit_for_bit(dataset, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train("--data", dataset, "--out", straight, "--epochs", 2, *RANDOM_RECIPE) == 0
    assert _train("--data", dataset, "--out", resumed, "--epochs", 1, *RANDOM_RECIPE) == 0
    with open(resumed / "log.csv", "a") as f:  # as if killed after logging epoch 2 but before its resume state
        f.write("2,0.001,9.9,0,0,0,0,1\n")
    assert _train("--resume", resumed, "--epochs", 2) == 0

    a, b = load_file(straight / "last.safetensors"), load_file(resumed / "last.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[name], b[name]) for name in a)
    state_a, state_b = (torch.load(run / "resume.pt", weights_only=True) for run in (straight, resumed))
    for index, moments in state_a["optimizer"]["state"].items():
        assert all(torch.equal(moments[key], state_b["optimizer"]["state"][index][key]) for key in moments)
    assert torch.equal(state_a["rng"][0][0], state_b["rng"][0][0])
    drop_time = [{k: v for k, v in row.items() if k != "seconds"} for row in _log_rows(straight)]
    assert drop_time == [{k: v for k, v in row.items() if k != "seconds"} for row in _log_rows(resumed)]
    assert [row["epoch"] for row in drop_time] == ["1", "2"]

    # The model drew random numbers (dropout, random-K), so restoring the RNG state mattered.
    torch.manual_seed(0)
    assert not torch.equal(state_a["rng"][0][0], torch.get_rng_state())

    options = json.loads((straight / "options.json").read_text())
    assert options["dropout"] == "paper" and options["random_k_weight"] == 0.02 and options["crop"] == 48
    with safe_open(str(straight / "last.safetensors"), framework="pt") as f:
        assert f.metadata()["epoch"] == "2"
        assert json.loads(f.metadata()["lfm_config"])["model"] == "lfm"


def test_resume_refuses_changes_and_reruns(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--data", dataset, "--out", run, "--epochs", 1, *RANDOM_RECIPE) == 0
    assert _train("--resume", run, "--lr", "0.1") == 2
    assert "cannot change --lr when resuming" in capsys.readouterr().err
    assert _train("--data", dataset, "--out", run, "--epochs", 1, *RANDOM_RECIPE) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _train("--resume", tmp_path / "nothing") == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_early_stopping_ends_the_run(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    # lr 0: only BatchNorm's running statistics move, so validation accuracy soon stops changing.
    args = ["--data", dataset, "--out", run, "--epochs", 8, "--lr", 0, "--patience", 2, "--resize", 0, "--crop", 0,
            "--classes", "car", "--workers", 0, "--no-progress"]
    assert _train(*args) == 0
    assert "early stop" in capsys.readouterr().out
    accuracy = [float(row["val_acc"]) for row in _log_rows(run)]
    best_epoch = accuracy.index(max(accuracy)) + 1
    assert len(accuracy) == best_epoch + 2 < 8  # two epochs without gain after the best, then stop
    assert _train("--resume", run, "--epochs", 10) == 0
    assert f"stopped early at epoch {len(accuracy)}; nothing to do" in capsys.readouterr().out
    assert len(_log_rows(run)) == len(accuracy)


@pytest.mark.parametrize("model, precision, cls", [("npr", "float32", NPR), ("lfm-gap", "float32", LFMGAP),
                                                   ("lfm", "bf16", LFM)])
def test_models_and_precisions_train(dataset, tmp_path, model, precision, cls):
    run = tmp_path / model
    assert _train("--data", dataset, "--out", run, "--epochs", 1, "--model", model, "--precision", precision,
                  "--classes", "car", "--resize", 0, "--crop", 0, "--batch-size", 8, "--workers", 0) == 0
    row = _log_rows(run)[0]
    assert math.isfinite(float(row["train_loss"])) and 0 <= float(row["val_acc"]) <= 1
    loaded, config = load_model(run / "best.safetensors")
    assert type(loaded) is cls and config["model"] == model


def test_float64_trains_and_evaluates_in_float64(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--data", dataset, "--out", run, "--epochs", 1, "--precision", "float64", "--backend", "torch",
                  "--classes", "car", "--resize", 0, "--crop", 0, "--batch-size", 8, "--workers", 0) == 0
    assert {t.dtype for t in load_file(run / "last.safetensors").values() if t.is_floating_point()} == {torch.float64}
    model, _ = load_model(run / "last.safetensors", dtype=torch.float64)
    assert torch.equal(model.fc1.weight, load_file(run / "last.safetensors")["fc1.weight"])  # not rounded to float32
    out = tmp_path / "eval"
    assert main(["eval", "--weights", str(run / "last.safetensors"), "--data", str(dataset / "val"), "--out", str(out),
                 "--precision", "float64", "--backend", "torch", "--workers", "0", "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["precision"] == "float64"
    capsys.readouterr()
    assert _train("--data", dataset, "--out", tmp_path / "triton", "--precision", "float64", "--backend", "triton",
                  "--classes", "car") == 2
    assert "--precision float64 runs on the torch backend only" in capsys.readouterr().err


def test_lfm_learns_an_upsampling_trace(dataset, tmp_path):
    run = tmp_path / "run"
    assert _train("--data", dataset, "--out", run, "--epochs", 3, "--lr", "1e-3", "--resize", 0, "--crop", 0,
                  "--batch-size", 8, "--workers", 0) == 0
    assert max(float(row["val_acc"]) for row in _log_rows(run)) >= 0.9


def test_training_goes_on_past_unreadable_files(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "train" / "car" / "0_real" / "notes.txt").write_text("not an image")
    fakes = data / "train" / "car" / "1_fake"
    (fakes / "cut.png").write_bytes((fakes / "000.png").read_bytes()[:80])
    # One worker: the failures cross a process boundary.
    assert _train("--data", data, "--out", tmp_path / "run", "--epochs", 2, "--resize", 0, "--crop", 0,
                  "--classes", "car", "--batch-size", 8, "--workers", 1) == 0
    err = capsys.readouterr().err
    assert err.count("skipped 2 file(s)") == 1  # reported once, not every epoch
    assert "notes.txt: not a readable image" in err and "cut.png" in err


def test_training_errors_exit_2(tmp_path, capsys):
    assert _train("--data", tmp_path / "missing", "--out", tmp_path / "run") == 2
    assert "no train folder" in capsys.readouterr().err
    assert _train("--out", tmp_path / "run") == 2
    assert "--data is required" in capsys.readouterr().err
    (tmp_path / "d" / "train" / "0_real").mkdir(parents=True)
    (tmp_path / "d" / "val" / "0_real").mkdir(parents=True)
    assert _train("--data", tmp_path / "d", "--out", tmp_path / "run") == 2
    assert "empty dataset" in capsys.readouterr().err
    assert _train("--data", tmp_path / "d", "--model", "npr", "--random-k-weight", "0.1") == 2
    assert "applies to --model lfm only" in capsys.readouterr().err


def test_aug_sets_the_blur_and_jpeg_probabilities(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--data", dataset, "--out", run, "--epochs", 1, "--aug", "blur:0.1,jpg:0.2", "--classes", "car",
                  "--resize", 0, "--crop", 0, "--batch-size", 8, "--workers", 0) == 0
    options = json.loads((run / "options.json").read_text())
    assert (options["blur_prob"], options["jpeg_prob"]) == (0.1, 0.2)
    for spec, message in (("blur:1.5", "'blur:1.5': the probability of blur must lie in [0, 1], got '1.5'"),
                          ("crop:0.1", "'crop:0.1': unknown kind 'crop'; expected one of blur, jpeg"),
                          ("blur", "expected KIND:PROBABILITY")):
        assert _train("--data", dataset, "--out", tmp_path / "bad", "--aug", spec) == 2
        err = capsys.readouterr().err
        assert err.startswith("lfm train: error: argument --aug: ") and message in err and err.count("\n") == 1
        assert not (tmp_path / "bad").exists()


def test_best_epoch_by_ap_on_a_validation_root(dataset, tmp_path, capsys):
    # A validation root in another layout (a CSV list), with one unreadable file to show it is the one read.
    files = sorted((dataset / "val" / "cat").rglob("*.png"))
    (tmp_path / "broken.png").write_text("not an image")
    listing = tmp_path / "val.csv"
    listing.write_text("".join(f"{f},{int('1_fake' in str(f))}\n" for f in files) + "broken.png,1\n")
    run = tmp_path / "run"
    assert _train("--data", dataset, "--out", run, "--epochs", 4, "--lr", "1e-3", "--val-data", listing,
                  "--select-by", "ap", "--min-delta", 0, "--patience", 0, "--classes", "car", "--resize", 0,
                  "--crop", 0, "--batch-size", 8, "--workers", 0, "--no-progress") == 0
    captured = capsys.readouterr()
    assert "val: skipped 1 file(s)" in captured.err and "broken.png" in captured.err
    ap = [float(row["val_ap"]) for row in _log_rows(run)]
    best = ap.index(max(ap)) + 1  # the first epoch of the best AP
    assert f"best validation AP {100 * max(ap):.2f} at epoch {best}" in captured.out
    with safe_open(str(run / "best.safetensors"), framework="pt") as f:
        assert f.metadata()["epoch"] == str(best)
    only_fake = tmp_path / "only_fake.csv"
    only_fake.write_text(f"{files[-1]},1\n")
    assert _train("--data", dataset, "--out", tmp_path / "r2", "--val-data", only_fake, "--select-by", "ap") == 2
    assert "--select-by ap needs real and fake validation images" in capsys.readouterr().err
