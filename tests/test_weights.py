"""Reading and writing weights: the authors' .pth in its variants, our safetensors, atomic writes."""
import pickle

import pytest
import torch
from utils import assert_authors_logits

from lfm import LFM, NPR
from lfm.errors import UsageError
from lfm.weights import atomic_write, build_model, load_model, read_state_dict, save_weights


class NotATensor:
    pass


def _lfm_state(seed=0):
    torch.manual_seed(seed)
    return LFM(k=4).state_dict()


@pytest.mark.parametrize("variant", ["bare", "wrapped", "module_prefix", "wrapped_module_prefix"])
def test_pth_variants_load_alike(variant, tmp_path):
    state = _lfm_state()
    saved = state
    if "module_prefix" in variant:
        saved = {f"module.{name}": t for name, t in saved.items()}
    if variant.startswith("wrapped"):
        saved = {"model": saved, "epoch": 3}
    torch.save(saved, tmp_path / "w.pth")
    model, config = load_model(tmp_path / "w.pth")
    assert config == {"model": "lfm", "k": 4}  # K read from the head: 64 * 4 inputs
    assert all(torch.equal(model.state_dict()[name], state[name]) for name in state)
    assert not model.training


def test_safetensors_record_their_architecture(tmp_path):
    torch.manual_seed(0)
    npr = NPR()
    save_weights(npr, tmp_path / "npr.safetensors", {"model": "npr"}, epoch=2)
    model, config = load_model(tmp_path / "npr.safetensors")
    assert isinstance(model, NPR) and config == {"model": "npr"}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), npr.state_dict().values()))
    with pytest.raises(UsageError, match="holds a 'npr' model, not 'lfm'"):
        load_model(tmp_path / "npr.safetensors", model_name="lfm")


def test_pickles_that_are_not_plain_tensors_are_refused(tmp_path):
    torch.save({"model": _lfm_state(), "extra": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(UsageError, match="cannot read weights"):
        read_state_dict(tmp_path / "evil.pth")
    (tmp_path / "raw.pth").write_bytes(pickle.dumps(NotATensor(), protocol=2))
    with pytest.raises(UsageError, match="cannot read weights"):
        read_state_dict(tmp_path / "raw.pth")


def test_wrong_architecture_and_missing_files_are_usage_errors(tmp_path):
    torch.save(_lfm_state(), tmp_path / "lfm.pth")
    with pytest.raises(UsageError, match="does not fit model 'npr'.*--model"):
        load_model(tmp_path / "lfm.pth", model_name="npr")
    with pytest.raises(UsageError, match="no such weights file"):
        load_model(tmp_path / "missing.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UsageError, match="holds no state_dict"):
        load_model(tmp_path / "list.pth")


def test_authors_checkpoint_loads(official, authors_logits):
    model, config = load_model(official["dir"] / "bs_model.pth")
    assert config == {"model": "lfm", "k": 16}
    with torch.no_grad():
        assert_authors_logits(model(authors_logits["x224"][0]), authors_logits, "x224")


def test_build_model_names():
    assert type(build_model({"model": "lfm-gap"})).__name__ == "LFMGAP"
    assert build_model({"model": "lfm", "k": 8, "dropout": "off"}).k == 8
    with pytest.raises(UsageError, match="unknown model"):
        build_model({"model": "resnet"})


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write(target, lambda tmp: tmp.write_text("old"))

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary file left behind


@pytest.mark.parametrize("k, tensors, message", [
    (10 ** 8, {"fc1.weight": torch.zeros(1, 64)}, r"head fc1.weight is \(1, 64\), but its architecture .* needs "
                                                  r"\(1, 6400000000\)"),
    (10 ** 18, {"fc1.weight": torch.zeros(1, 64)}, r"needs \(1, 64000000000000000000\)"),
    (10 ** 7, {"cnn.layer1.conv.weight": torch.zeros(1)}, "holds no head fc1.weight to check k = 10000000 against"),
    (16.5, {"fc1.weight": torch.zeros(1, 64)}, "k must be an int >= 1, got 16.5"),
])
def test_safetensors_metadata_is_checked_against_the_tensors_before_building(k, tensors, message, tmp_path,
                                                                             monkeypatch):
    """A tiny file whose metadata asks for a huge head is refused before any model is built (building it
    would allocate 25.6 GB at k = 1e8)."""
    import json

    from safetensors.torch import save

    import lfm.weights

    def no_building(*args, **kwargs):
        raise AssertionError("a model was built before the metadata was checked")

    path = tmp_path / "huge.safetensors"
    path.write_bytes(save(tensors, metadata={lfm.weights.CONFIG_KEY: json.dumps({"model": "lfm", "k": k})}))
    monkeypatch.setattr(lfm.weights, "build_model", no_building)
    with pytest.raises(UsageError, match=message):
        load_model(path)
