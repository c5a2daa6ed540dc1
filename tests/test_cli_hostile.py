"""The command line under hostile input: every case ends with the promised exit code and
one line naming the problem, never a traceback, and loses no work done before it."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import real_image, write_labeled, write_training_set
from utils import NETWORK_FLOOR, assert_as_accurate

from lfm import LFM
from lfm.cli import main
from lfm.data import Item
from lfm.errors import CommandFailed
from lfm.heatmap import overlay
from lfm.images import MAX_PIXELS_LIMIT, EvalTransform
from lfm.inference import scored_in_order
from lfm.runtime import Context
from lfm.train import LOCK_FILE, _take_lock
from lfm.weights import CONFIG_KEY, save_weights

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four 48x48 PNGs, a.png ... d.png."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in "abcd":
        Image.fromarray(real_image(rng)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_training_set(tmp_path_factory.mktemp("tiny"), classes=("car",), n_train=4, n_val=2)


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(result, code, command, fragment):
    """Exit code `code`, and stderr ends with one `lfm <command>: error:` line holding `fragment`."""
    got, _, err = result
    assert got == code, err
    lines = err.splitlines()
    assert lines and lines[-1].startswith(f"lfm {command}: error: ") and fragment in lines[-1], err
    assert sum(": error: " in line for line in lines) == 1 and "Traceback" not in err


def predict(capsys, weights, *args):
    return run(capsys, "predict", "--weights", weights, "--workers", 0, *args)


def _cli(*args, stdout=subprocess.PIPE, text=True, **kwargs):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=stdout, stderr=subprocess.PIPE, text=text,
                            **kwargs)


# 1. Symlink loops --------------------------------------------------------------------------------
def test_a_glob_through_symlink_loops_ends_and_scores_each_image_once(weights, images, tmp_path, capsys):
    loop = tmp_path / "L"
    loop.mkdir()
    for name in ("a.png", "b.png"):
        (loop / name).write_bytes((images / name).read_bytes())
    (loop / "self").symlink_to(".")
    (loop / "parent").symlink_to("../L")
    code, out, _ = predict(capsys, weights, loop / "**" / "*.png")
    assert code == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(loop / "a.png"), str(loop / "b.png")]


# 2. Streaming --------------------------------------------------------------------------------------
def test_predict_streams_so_an_interrupt_keeps_the_lines_and_heatmaps_done(weights, images, tmp_path, capsys,
                                                                          monkeypatch):
    import lfm.data

    read = lfm.data.read_rgb

    def interrupted_at_c(path, *args):
        if Path(path).name == "c.png":
            raise KeyboardInterrupt
        return read(path, *args)

    monkeypatch.setattr(lfm.data, "read_rgb", interrupted_at_c)
    code, out, err = predict(capsys, weights, images, "--batch-size", 1, "--heatmap", tmp_path / "heat")
    assert code == 130 and err == "lfm predict: interrupted\n"
    assert [Path(line.split("\t")[0]).name for line in out.splitlines()] == ["a.png", "b.png"]
    assert sorted(p.name for p in (tmp_path / "heat").iterdir()) == ["a.png", "b.png"]


def test_a_closed_pipe_ends_predict_quietly(weights, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(real_image(rng)).save(tmp_path / f"{i:02d}.png")
    proc = _cli("-m", "lfm", "predict", "--weights", str(weights), str(tmp_path), "--batch-size", "1",
                "--workers", "0")
    first = proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and first.startswith(str(tmp_path / "00.png")) and err == ""


# 3. Nothing useful happened: never exit 0 -----------------------------------------------------------
def test_nan_weights_are_refused_before_scoring(images, tmp_path, capsys):
    model = LFM()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    save_weights(model, tmp_path / "nan.safetensors", {"model": "lfm"})
    torch.save(model.state_dict(), tmp_path / "nan.pth")
    for name in ("nan.safetensors", "nan.pth"):
        result = predict(capsys, tmp_path / name, images)
        assert_error(result, 2, "predict", "holds NaN or infinite values in fc1.weight")
        assert result[1] == ""


def test_nan_scores_are_an_error_of_the_model(weights, images, capsys, monkeypatch):
    monkeypatch.setattr(LFM, "forward", lambda self, x: torch.full((len(x), 1), float("nan")))
    assert_error(predict(capsys, weights, images), 1, "predict", f"the model scores NaN for {images / 'a.png'}")
    with pytest.raises(CommandFailed, match="scores NaN"):  # validation and eval score through the same check
        list(scored_in_order(LFM().eval(), [Item(images / "a.png")], EvalTransform(), Context()))


def test_no_scorable_image_is_an_error(weights, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    result = predict(capsys, weights, tmp_path)
    assert_error(result, 2, "predict", "no image could be scored among the 1 file(s)")
    assert "skipped 1 file(s)" in result[2]
    write_labeled(tmp_path / "set", 1, 1, np.random.default_rng(0))
    for path in (tmp_path / "set").rglob("*.png"):
        path.write_bytes(b"broken")
    result = run(capsys, "eval", "--weights", weights, "--data", tmp_path / "set", "--out", tmp_path / "out",
                 "--workers", 0)
    assert_error(result, 2, "eval", "no image could be scored among the 2 file(s)")


def test_a_subset_with_no_scorable_image_is_warned_about(weights, tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_labeled(tmp_path / "set" / "good", 1, 1, rng)
    write_labeled(tmp_path / "set" / "broken", 1, 1, rng)
    for path in (tmp_path / "set" / "broken").rglob("*.png"):
        path.write_bytes(b"broken")
    code, _, err = run(capsys, "eval", "--weights", weights, "--data", tmp_path / "set", "--out", tmp_path / "out",
                       "--workers", 0)
    assert code == 0 and "subset broken: no image could be scored; it is left out of the mean" in err


def test_a_backend_that_cannot_run_is_a_usage_error(weights, images, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    result = predict(capsys, weights, images, "--backend", "triton", "--device", "cpu")
    assert_error(result, 2, "predict", "--backend triton needs a CUDA device")
    assert result[1] == ""


# 5. Output targets are checked first ---------------------------------------------------------------
def test_output_targets_are_checked_before_any_image(weights, images, tmp_path, capsys, monkeypatch):
    import lfm.data

    def no_reading(*args):
        raise AssertionError("an image was read")

    monkeypatch.setattr(lfm.data, "read_rgb", no_reading)
    (tmp_path / "file").write_text("x")
    assert_error(predict(capsys, weights, images, "--heatmap", tmp_path / "file"), 2, "predict",
                 f"--heatmap {tmp_path / 'file'} is not a folder")
    assert_error(predict(capsys, weights, images, "--heatmap", tmp_path / "file" / "sub"), 2, "predict",
                 "cannot create the folder")
    write_labeled(tmp_path / "set", 1, 1, np.random.default_rng(0))
    assert_error(run(capsys, "eval", "--weights", weights, "--data", tmp_path / "set", "--out", tmp_path / "file"),
                 2, "eval", f"--out {tmp_path / 'file'} is not a folder")


# 6. Run folders ----------------------------------------------------------------------------------------
def _train(capsys, dataset, out, *args):
    return run(capsys, "train", "--data", dataset, "--out", out, "--epochs", 1, "--resize", 0, "--crop", 0,
               "--batch-size", 4, "--workers", 0, *args)


def test_a_run_folder_in_use_is_refused(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = _take_lock(run_dir)  # as another training process would hold it
    try:
        assert_error(_train(capsys, dataset, run_dir), 2, "train",
                     f"{run_dir} is in use by another lfm train (process {os.getpid()}")
    finally:
        os.close(fd)
    # The lock file of a process that died without releasing it is stale: taken over, then removed.
    (run_dir / LOCK_FILE).write_text("999999\n")
    code, _, err = _train(capsys, dataset, run_dir)
    assert code == 0 and "process 999999 ended without releasing the lock" in err
    assert not (run_dir / LOCK_FILE).exists() and (run_dir / "resume.pt").exists()


def test_a_folder_that_holds_no_run_of_ours_is_refused_unless_forced(dataset, tmp_path, capsys):
    run_dir = tmp_path / "theirs"
    run_dir.mkdir()
    (run_dir / "log.csv").write_text("their log\n")
    assert_error(_train(capsys, dataset, run_dir), 2, "train", "is not empty (log.csv) and holds no run of ours")
    assert (run_dir / "log.csv").read_text() == "their log\n"
    assert _train(capsys, dataset, run_dir, "--force")[0] == 0
    assert_error(_train(capsys, dataset, run_dir), 2, "train", "already holds a run")


# 7. Memory -------------------------------------------------------------------------------------------
def test_large_batches_go_through_the_model_in_bounded_chunks(weights, images, capsys, monkeypatch):
    import lfm.inference

    def probs(out):
        return torch.tensor([json.loads(line)["prob_fake"] for line in out.splitlines()], dtype=torch.float64)

    whole, truth = (probs(predict(capsys, weights, images, "--no-resize", "--json", "--precision", precision)[1])
                    for precision in ("float32", "float64"))
    seen = []
    forward = LFM.forward

    def recording(self, x, **kwargs):
        seen.append(len(x))
        return forward(self, x, **kwargs)

    monkeypatch.setattr(lfm.inference, "FORWARD_PIXELS", 2 * 48 * 48)
    monkeypatch.setattr(LFM, "forward", recording)
    code, out, _ = predict(capsys, weights, images, "--no-resize", "--batch-size", 4, "--json")
    assert code == 0 and seen == [2, 2]
    # In chunks, against the model in float64, as accurate as the whole batch at once.
    assert_as_accurate(probs(out), whole, truth, "probabilities", floor=NETWORK_FLOOR)


def test_heatmap_overlay_in_bands_matches_the_whole_image(monkeypatch):
    import lfm.heatmap

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (301, 203, 3), dtype=np.uint8))
    heat = (rng.random((64, 48)) * 100).astype(np.float32)
    whole = np.asarray(overlay(img, heat))
    monkeypatch.setattr(lfm.heatmap, "BAND_PIXELS", 203 * 7)
    banded = np.asarray(overlay(img, heat))
    assert np.abs(banded.astype(int) - whole.astype(int)).max() <= 1


def test_max_pixels_cannot_exceed_what_pillow_opens(weights, images, capsys):
    assert_error(predict(capsys, weights, images, "--max-pixels", MAX_PIXELS_LIMIT + 1), 2, "predict",
                 f"--max-pixels must lie in [1, {MAX_PIXELS_LIMIT}]")


# 8. Exit codes and messages ----------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, message", [
    ("--lr", "-0.1", "--lr must be a finite number >= 0, got -0.1"),
    ("--lr", "nan", "--lr must be a finite number >= 0, got nan"),
    ("--k", "0", "--k must be an integer >= 1, got 0"),
    ("--pmin", "1.5", "--pmin must be in [0, 1), got 1.5"),
    ("--workers", "-1", "--workers must be >= 0, got -1"),
    ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("--epochs", "x", "argument --epochs: invalid int value: 'x'"),
])
def test_bad_training_options_exit_2_naming_the_value(option, value, message, dataset, tmp_path, capsys):
    result = run(capsys, "train", "--data", dataset, "--out", tmp_path / "run", option, value)
    assert_error(result, 2, "train", message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["predict", "--weights", "W", "IMAGES", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["eval", "--weights", "W", "--data", "IMAGES", "--subset-depth", "-1"], "--subset-depth must be >= 0, got -1"),
    (["predict", "--weights", "W", "IMAGES", "--max-pixels", "0"], "--max-pixels must lie in [1, "),
    (["predict", "--weights", "W", "/dev/null"], "not a regular file or folder: /dev/null"),
    (["predict", "--weights", "/dev/null", "IMAGES"], "weights /dev/null: not a regular file"),
    (["predict", "--weights", "IMAGES", "IMAGES"], "is a folder, not a weights file"),
    (["eval", "--weights", "W", "--data", "/dev/null"], "/dev/null is not a folder"),
])
def test_bad_scoring_options_exit_2(argv, message, weights, images, capsys):
    names = {"W": weights, "IMAGES": images}
    assert_error(run(capsys, *[names.get(arg, arg) for arg in argv]), 2, argv[0], message)


def _weights_files(tmp_path):
    """Weights files that are not weights, and the message each must give."""
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("hello\n")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    torch.save(LFM().state_dict(), tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:5000])
    (tmp_path / "random.safetensors").write_bytes(np.random.default_rng(1).bytes(4096))
    save_weights(LFM(), tmp_path / "meta.safetensors", {"model": "lfm"})
    data = (tmp_path / "meta.safetensors").read_bytes()
    (tmp_path / "meta.safetensors").write_bytes(data.replace(b'{\\"model\\": \\"lfm\\"}', b'{\\"model\\": 1234567}'))
    save_weights(LFM(), tmp_path / "k0.safetensors", {"model": "lfm", "k": 0})
    not_ours = "not a PyTorch checkpoint"
    return [
        ("random.pth", not_ours), ("empty.pth", not_ours), ("text.pth", not_ours),
        ("module.pth", "it holds a pickled torch.nn.modules.linear.Linear object, not plain tensors"),
        ("cut.pth", "a PyTorch checkpoint that is truncated or corrupt"),
        ("random.safetensors", "not a safetensors file, or a damaged one"),
        ("meta.safetensors", f"records an architecture that is not one of ours in its '{CONFIG_KEY}' metadata"),
        ("k0.safetensors", "records an architecture that cannot be built"),
    ]


def test_files_that_are_not_weights_exit_2_with_one_clear_line(images, tmp_path, capsys):
    for name, message in _weights_files(tmp_path):
        result = predict(capsys, tmp_path / name, images)
        assert_error(result, 2, "predict", message)
        assert str(tmp_path / name) in result[2] and "\x1b" not in result[2] and "weights_only=False" not in result[2]


def test_a_corrupt_resume_state_exits_2_naming_it(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(capsys, dataset, run_dir)[0] == 0
    (run_dir / "resume.pt").write_bytes((run_dir / "resume.pt").read_bytes()[:3000])
    assert_error(run(capsys, "train", "--resume", run_dir), 2, "train",
                 f"cannot read the resume state {run_dir / 'resume.pt'}: a PyTorch checkpoint that is truncated")
    torch.save({"epoch": 1}, run_dir / "resume.pt")
    assert_error(run(capsys, "train", "--resume", run_dir), 2, "train", "is not a resume state of this run")
    (run_dir / "options.json").write_text("{not json")
    assert_error(run(capsys, "train", "--resume", run_dir), 2, "train", "not the options of a run of ours")


# 9. The head's width -------------------------------------------------------------------------------
def test_the_head_width_must_match_the_recorded_or_inferred_k(images, tmp_path, capsys):
    torch.manual_seed(0)
    save_weights(LFM(k=8), tmp_path / "k8.safetensors", {"model": "lfm", "k": 16})
    assert_error(predict(capsys, tmp_path / "k8.safetensors", images), 2, "predict",
                 "its head fc1.weight is (1, 512), but its architecture")
    torch.save(LFM(k=8).state_dict(), tmp_path / "k8.pth")
    code, out, err = predict(capsys, tmp_path / "k8.pth", images)
    assert code == 0 and len(out.splitlines()) == 4
    assert err == f"lfm predict: warning: {tmp_path / 'k8.pth'}: K = 8 inferred from its head fc1.weight (1, 512) " \
                  "(the released model has K = 16)\n"
    state = LFM().state_dict()
    state["fc1.weight"] = torch.zeros(1, 100)
    torch.save(state, tmp_path / "odd.pth")
    assert_error(predict(capsys, tmp_path / "odd.pth", images), 2, "predict", "not 1 x (64 * K), so it is no LFM")


# 10. Ctrl-C while the data loader starts its workers -----------------------------------------------
def test_ctrl_c_while_workers_start_stops_training(dataset, tmp_path):
    script = tmp_path / "interrupt_at_fork.py"
    script.write_text(
        "import os, signal, sys\n"
        "sent = []\n"
        "def interrupt_once():\n"
        "    if not sent:\n"
        "        sent.append(True)\n"
        "        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands in the at-fork hook\n"
        "os.register_at_fork(after_in_parent=interrupt_once)\n"
        "from lfm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    run_dir = tmp_path / "run"
    proc = _cli(str(script), "train", "--data", str(dataset), "--out", str(run_dir), "--epochs", "3", "--resize", "0",
                "--crop", "0", "--batch-size", "4", "--workers", "1", "--no-progress",
                env={**os.environ, "PYTHONPATH": str(REPO)})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err == "lfm train: interrupted (continue a training run with --resume RUN)\n"
    assert not (run_dir / LOCK_FILE).exists() and not (run_dir / "resume.pt").exists()


# 11. Smaller ones ------------------------------------------------------------------------------------
def test_tabs_and_newlines_in_names_are_escaped_and_heatmaps_named(weights, images, tmp_path, capsys):
    odd = tmp_path / "a\tb\nc.png"
    odd.write_bytes((images / "a.png").read_bytes())
    code, out, _ = predict(capsys, weights, odd, "--heatmap", tmp_path / "heat")
    assert code == 0
    (line,) = out.splitlines()
    path, prob, heatmap = line.split("\t")
    assert path == str(tmp_path / "a\\tb\\nc.png") and 0 <= float(prob) <= 1
    assert heatmap == str(tmp_path / "heat" / "a\\tb\\nc.png") and (tmp_path / "heat" / "a\tb\nc.png").is_file()
    code, out, _ = predict(capsys, weights, odd, "--json")
    assert json.loads(out)["path"] == str(odd)


def test_exif_orientation_is_ignored_unless_asked(weights, tmp_path, capsys):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(pixels).save(tmp_path / "tagged.png", exif=exif)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")

    def prob(*args):
        code, out, _ = predict(capsys, weights, *args, "--no-resize", "--json")
        assert code == 0
        return json.loads(out)["prob_fake"]

    assert prob(tmp_path / "tagged.png") == prob(tmp_path / "plain.png")
    assert prob(tmp_path / "tagged.png", "--exif-transpose") == prob(tmp_path / "upright.png")  # the same pixels


def test_one_class_validation_is_warned(tmp_path, capsys):
    data = write_training_set(tmp_path / "data", classes=("car",), n_train=4, n_val=2)
    for path in (data / "val" / "car" / "1_fake").iterdir():
        path.unlink()
    (data / "val" / "car" / "1_fake").rmdir()
    code, _, err = _train(capsys, data, tmp_path / "run")
    assert code == 0 and "the val set holds only real images (2)" in err


def test_help_describes_every_option(capsys):
    for command, needles in (("predict", ["PATH ", "image files, folders", "per batch (default 16)"]),
                             ("eval", ["predictions.csv"]),
                             ("train", ["--seed SEED", "(0)", "--lr-gamma", "(0.9)", "(32)"]),
                             ("demo", ["training epochs per model", "crops per source photo"])):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert all(needle in text for needle in needles), (command, needles)


# 12. Options that must fail before any work --------------------------------------------------------
@pytest.mark.parametrize("seed", ["-1", str(2 ** 64), str(2 ** 63)])
def test_a_seed_out_of_range_is_refused_before_the_run_folder(seed, dataset, tmp_path, capsys):
    result = run(capsys, "train", "--data", dataset, "--out", tmp_path / "run", "--seed", seed)
    assert_error(result, 2, "train", f"--seed must be an integer in [0, 2**63 - 1], got {seed}")
    assert not (tmp_path / "run").exists()
    assert_error(run(capsys, "demo", "--out", tmp_path / "demo", "--seed", seed), 2, "demo",
                 f"--seed must be an integer in [0, 2**63 - 1], got {seed}")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("device", ["mps", "meta", "xla", "cuda:99" if torch.cuda.is_available() else "ipu"])
def test_a_device_that_cannot_run_is_refused_before_any_image(device, weights, images, dataset, tmp_path, capsys,
                                                              monkeypatch):
    import lfm.data

    def no_reading(*args):
        raise AssertionError("an image was read")

    monkeypatch.setattr(lfm.data, "read_rgb", no_reading)
    assert_error(predict(capsys, weights, images, "--device", device), 2, "predict", f"device {device!r}")
    assert_error(run(capsys, "eval", "--weights", weights, "--data", dataset / "val", "--out", tmp_path / "eval",
                     "--device", device), 2, "eval", f"device {device!r}")
    assert_error(_train(capsys, dataset, tmp_path / "run", "--device", device), 2, "train", f"device {device!r}")
    assert not (tmp_path / "run").exists()


def test_resuming_a_run_whose_log_is_missing_or_empty_is_refused(dataset, tmp_path, capsys, monkeypatch):
    import lfm.data

    run_dir = tmp_path / "run"
    assert _train(capsys, dataset, run_dir)[0] == 0
    resume_state = (run_dir / "resume.pt").read_bytes()

    def no_reading(*args):
        raise AssertionError("an image was read")

    monkeypatch.setattr(lfm.data, "read_rgb", no_reading)
    log = run_dir / "log.csv"
    log.unlink()
    assert_error(run(capsys, "train", "--resume", run_dir), 2, "train", f"cannot resume {run_dir}: no log.csv")
    for text, problem in (("", "it is empty"), ("epoch,lr\n", "its header is not"),
                          ("epoch,lr,train_loss,val_acc,val_ap,val_real_acc,val_fake_acc,seconds\nx,1\n",
                           "row 2 does not start with an epoch number")):
        log.write_text(text)
        assert_error(run(capsys, "train", "--resume", run_dir), 2, "train", f"{log}: {problem}")
        assert log.read_text() == text and (run_dir / "resume.pt").read_bytes() == resume_state


@pytest.mark.parametrize("key, value, message", [
    ("k", 16.5, '"k" must be an integer, got 16.5'),
    ("k", True, '"k" must be an integer, got true'),
    ("batch_size", "4", '"batch_size" must be an integer, got "4"'),
    ("lr", "fast", '"lr" must be a number, got "fast"'),
    ("betas", [0.9], '"betas" must be a pair of numbers, got [0.9]'),
    ("flip", 1, '"flip" must be true or false, got 1'),
    ("classes", "car", '"classes" must be a list of names or null, got "car"'),
    ("resize", -3, "--resize must be an integer >= 0, got -3"),
])
def test_a_hand_edited_options_file_is_refused_naming_the_value(key, value, message, dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(capsys, dataset, run_dir)[0] == 0
    options = json.loads((run_dir / "options.json").read_text())
    options[key] = value
    (run_dir / "options.json").write_text(json.dumps(options))
    assert_error(run(capsys, "train", "--resume", run_dir), 2, "train", message)


# 13. lfm export never replaces what is not a regular file ------------------------------------------
def _special_files(folder: Path) -> dict:
    """name -> path of an existing OUT that is not a regular file (a device node only where we may make one)."""
    (folder / "victim.txt").write_text("keep me\n")
    os.mkfifo(folder / "fifo")
    (folder / "link.pt2").symlink_to(folder / "victim.txt")
    (folder / "dangling.pt2").symlink_to(folder / "nowhere.pt2")
    special = {"fifo": folder / "fifo", "symlink": folder / "link.pt2", "dangling symlink": folder / "dangling.pt2"}
    try:
        os.mknod(folder / "null", 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))
        special["device"] = folder / "null"
    except PermissionError:
        pass
    return special


def test_export_refuses_an_out_that_is_not_a_regular_file(weights, tmp_path, capsys, monkeypatch):
    import lfm.weights

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    special = _special_files(tmp_path)
    monkeypatch.setattr(lfm.weights, "read_state_dict", no_loading)
    for kind, out in special.items():
        before = os.lstat(out)
        result = run(capsys, "export", "--weights", weights, "--format", "pt2", "--size", 64, out)
        assert_error(result, 2, "export", f"OUT {out} exists and is not a regular file")
        after = os.lstat(out)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode), kind
    assert (tmp_path / "victim.txt").read_text() == "keep me\n" and not (tmp_path / "nowhere.pt2").exists()
    assert "/dev/null" not in str(special.get("device", "")) and os.path.exists("/dev/null")


def test_export_writes_a_new_file_renamed_into_place(weights, tmp_path, capsys):
    """A hard-linked OUT is replaced, not written through; a link planted at a predictable temporary name
    is not written through either."""
    (tmp_path / "victim.txt").write_text("keep me\n")
    out = tmp_path / "m.pt2"
    os.link(tmp_path / "victim.txt", out)
    (tmp_path / f".m.pt2.{os.getpid()}.tmp").symlink_to(tmp_path / "victim.txt")
    code, printed, err = run(capsys, "export", "--weights", weights, "--format", "pt2", "--size", 64, out)
    assert code == 0, err
    assert (tmp_path / "victim.txt").read_text() == "keep me\n" and os.stat(out).st_nlink == 1
    assert torch.export.load(out).module()(torch.zeros(1, 3, 64, 64)).shape == (1, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".m.pt2.{os.getpid()}.tmp", "m.pt2", "victim.txt"])


# 14. Heatmaps never write over inputs or files of others -------------------------------------------------
def test_a_heatmap_folder_holding_inputs_is_refused(weights, images, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes((images / name).read_bytes())
    Image.open(images / "c.png").save(folder / "a.jpg")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    for heatmaps in (folder, tmp_path / "photos" / ".", tmp_path / "link"):
        if heatmaps.name == "link":
            heatmaps.symlink_to(folder)
        for inputs in (folder, folder / "a.png"):
            result = predict(capsys, weights, inputs, "--heatmap", heatmaps, "--batch-size", 1)
            assert_error(result, 2, "predict", f"--heatmap {heatmaps} holds input images ({folder / 'a.'}")
            assert result[1] == ""
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    # A folder beneath the inputs holds them once it holds a heatmap: a second run would score its own heatmaps.
    assert predict(capsys, weights, folder, "--heatmap", folder / "heat")[0] == 0
    assert_error(predict(capsys, weights, folder, "--heatmap", folder / "heat"), 2, "predict",
                 f"--heatmap {folder / 'heat'} holds input images ({folder / 'heat' / 'a.png'}")


def test_heatmaps_never_replace_a_file_they_did_not_create(weights, images, tmp_path, capsys):
    heat = tmp_path / "heat"
    heat.mkdir()
    (heat / "a.png").write_text("someone's notes\n")
    (heat / "b.png").symlink_to(tmp_path / "elsewhere.png")
    other = tmp_path / "other"
    other.mkdir()
    Image.open(images / "c.png").save(other / "a.jpg")
    code, out, err = predict(capsys, weights, images / "a.png", images / "b.png", other / "a.jpg", "--heatmap", heat)
    assert code == 0, err
    written = [Path(line.split("\t")[2]).name for line in out.splitlines()]
    assert written == ["a_1.png", "b_1.png", "a_2.png"]
    assert (heat / "a.png").read_text() == "someone's notes\n" and not (tmp_path / "elsewhere.png").exists()
    assert all(Image.open(heat / name).size == (48, 48) for name in written)
    # A second run writes beside the first run's heatmaps rather than over them.
    code, out, _ = predict(capsys, weights, images / "a.png", "--heatmap", heat)
    assert code == 0 and Path(out.split("\t")[2].strip()).name == "a_3.png"


# 15. File names that are not UTF-8 ----------------------------------------------------------------------
def _non_utf8_set(root: Path) -> Path:
    """A labeled set whose subset folder and one image per class have names that are not UTF-8."""
    rng = np.random.default_rng(0)
    subset = os.fsdecode(os.fsencode(root) + b"/caf\xe9")
    for label in ("0_real", "1_fake"):
        folder = Path(subset) / label
        folder.mkdir(parents=True)
        for name in (b"b\xff.png", b"ok.png"):
            Image.fromarray(real_image(rng)).save(os.fsdecode(os.fsencode(folder) + b"/" + name))
    return Path(subset)


def _strict_utf8_cli(*args):
    """Run `python -m lfm ...` with stdout encoded as strict UTF-8 (as under a UTF-8 locale); bytes out."""
    proc = _cli("-m", "lfm", *args, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"},
                text=False)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out


def test_eval_saves_results_whose_paths_are_not_utf8(weights, tmp_path):
    import csv

    subset = _non_utf8_set(tmp_path / "set")
    out = tmp_path / "out"
    table = _strict_utf8_cli("eval", "--weights", weights, "--data", tmp_path / "set", "--out", out, "--workers", "0")
    assert b"caf\xe9" in table
    with open(out / "predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    expected = sorted(os.fsencode(path) for path in subset.rglob("*.png"))
    assert sorted(os.fsencode(row["path"]) for row in rows) == expected  # the file system's own bytes
    assert all(Path(row["path"]).is_file() and 0 <= float(row["prob_fake"]) <= 1 for row in rows)
    assert json.loads((out / "results.json").read_text())["subsets"]["caf\udce9"]["n"] == 4
    assert (out / "results.csv").read_bytes().splitlines()[1].startswith(b"none,caf\xe9,4,")  # perturbation, subset, n


def test_predict_writes_paths_that_are_not_utf8_as_their_bytes(weights, tmp_path):
    subset = _non_utf8_set(tmp_path / "set")
    out = _strict_utf8_cli("predict", "--weights", weights, subset / "0_real", "--workers", "0")
    paths = [line.split(b"\t")[0] for line in out.splitlines()]
    assert paths == sorted(os.fsencode(path) for path in (subset / "0_real").iterdir())


# 16. --workers is capped, and Ctrl-C while they start ends the run --------------------------------------
def test_workers_are_capped_by_cores_images_and_memory_with_one_warning(weights, images, dataset, tmp_path, capsys,
                                                                         monkeypatch):
    import lfm.inference

    started = []
    make_loader = lfm.inference.make_loader

    def recording(dataset, sampler, batch_size, workers, **kwargs):
        started.append(workers)
        return make_loader(dataset, sampler, batch_size, 0, **kwargs)  # loads in this process all the same

    monkeypatch.setattr(lfm.inference, "make_loader", recording)
    code, out, err = run(capsys, "predict", "--weights", weights, images, "--workers", 1000000)
    assert code == 0 and len(out.splitlines()) == 4 and started == [1]
    assert err == ("lfm predict: warning: --workers 1000000 is more than can help here; using 1 (4 image(s) make "
                   "1 batch(es) of 16)\n")
    cores = len(os.sched_getaffinity(0))
    code, _, err = run(capsys, "predict", "--weights", weights, images, "--workers", 1000000, "--batch-size", 1)
    assert code == 0 and started[-1] == min(cores, 4) and err.count("warning") == 1
    monkeypatch.setattr(lfm.inference, "available_memory", lambda: lfm.inference.WORKER_BYTES * 3 // 2)
    code, _, err = run(capsys, "predict", "--weights", weights, images, "--workers", 2, "--batch-size", 1)
    assert code == 0 and started[-1] == 1 and "memory for 1" in err
    code, _, err = run(capsys, "predict", "--weights", weights, images, "--workers", 1, "--batch-size", 1)
    assert code == 0 and started[-1] == 1 and err == ""
    monkeypatch.undo()
    monkeypatch.setattr(lfm.inference, "make_loader", recording)
    code, _, err = run(capsys, "predict", "--weights", weights, images / "a.png", "--workers", 2)
    assert code == 0 and started[-1] == 1 and err == ""  # fewer batches than workers: no warning
    write_labeled(tmp_path / "set", 1, 1, np.random.default_rng(0))
    code, _, err = run(capsys, "eval", "--weights", weights, "--data", tmp_path / "set", "--out", tmp_path / "out",
                       "--workers", 1000000)
    assert code == 0 and started[-1] == 1 and "lfm eval: warning: --workers 1000000 is more than can help" in err
    code, _, err = _train(capsys, dataset, tmp_path / "run", "--workers", 1000000)
    assert code == 0 and err.count("lfm train: warning: --workers 1000000 is more than can help here; using") == 1


def test_ctrl_c_while_many_workers_start_ends_predict_at_once(weights, tmp_path):
    """Ctrl-C right after the first worker starts: exit 130 within a second, and every worker is gone."""
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(real_image(rng)).save(tmp_path / f"{i:02d}.png")
    children = tmp_path / "children"
    script = tmp_path / "interrupt_at_fork.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "sent = []\n"
        "def interrupt_once():\n"
        "    if not sent:\n"
        "        sent.append(time.monotonic())\n"
        "        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands in the at-fork hook\n"
        "def record_child():\n"
        f"    with open({str(children)!r}, 'a') as f:\n"
        "        f.write(f'{os.getpid()}\\n')\n"
        "os.register_at_fork(after_in_parent=interrupt_once, after_in_child=record_child)\n"
        "from lfm.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print(f'{time.monotonic() - sent[0]:.3f}', file=sys.stderr)\n"
        "sys.exit(code)\n")
    proc = _cli(str(script), "predict", "--weights", str(weights), str(tmp_path), "--batch-size", "1", "--workers",
                "1000000", "--no-progress", env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    lines = err.splitlines()
    assert proc.returncode == 130, err
    assert lines[-2] == "lfm predict: interrupted" and float(lines[-1]) < 1.0, err
    pids = [int(pid) for pid in children.read_text().split()]
    assert 1 <= len(pids) <= len(os.sched_getaffinity(0))
    time.sleep(0.5)
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and "State:\tZ" not in
             Path(f"/proc/{pid}/status").read_text()]
    assert not alive, f"worker processes left running: {alive}"
