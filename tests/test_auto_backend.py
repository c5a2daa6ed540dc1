"""backend="auto" on a GPU follows a GPU run's measurements of these kernels (bench/auto_backend.py ->
lfm_kernels/auto_backend.json -> configs.auto_choice), and ignores measurements of other kernels."""
import json

import pytest

import bench.auto_backend as writer
from lfm_kernels import configs


def _row(op, mode, provider, median_s, batch=256, dtype="float32"):
    return {"kind": "row", "op": op, "mode": mode, "provider": provider, "median_s": median_s, "batch": batch,
            "dtype": dtype}


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "auto_backend.json"
    monkeypatch.setattr(configs, "AUTO_TABLE", path)
    monkeypatch.setattr(writer, "AUTO_TABLE", path)
    configs._auto_table.cache_clear()
    yield path
    configs._auto_table.cache_clear()


def _results(tmp_path, fingerprint, rows):
    path = tmp_path / "run.jsonl"
    header = {"kind": "header", "environment": {"kernels_fingerprint": fingerprint, "capability": [9, 0]}}
    path.write_text("\n".join(json.dumps(r) for r in [header, *rows]) + "\n")
    return path


def test_ops_measured_slower_take_the_composition_on_that_family_only(table, tmp_path):
    rows = [_row("snet_block2", "forward", "triton", 2.0), _row("snet_block2", "forward", "eager", 1.0),
            _row("snet_block2", "forward", "triton", 0.1, batch=1),
            _row("snet_block2", "forward", "eager", 9.0, batch=1),
            _row("npr_residual", "forward", "triton", 1.0), _row("npr_residual", "forward", "eager", 3.0),
            _row("snet_head", "forward+backward", "triton", 5.0), _row("snet_head", "forward+backward", "eager", 4.0)]
    assert writer.main([str(_results(tmp_path, configs.kernels_fingerprint(), rows))]) == 0
    configs._auto_table.cache_clear()
    assert configs.auto_choice("sm90", "snet_block/cin=64", "inference", "float32") == "torch"  # at batch 256
    assert configs.auto_choice("sm90", "npr_residual", "inference", "float32") == "triton"
    assert configs.auto_choice("sm90", "snet_head", "training", "float32") == "torch"
    assert configs.auto_choice("sm90", "snet_head", "inference", "float32") == "triton"  # not measured
    assert configs.auto_choice("sm80", "snet_block/cin=64", "inference", "float32") == "triton"
    assert configs.auto_choice("sm90", "snet_block/cin=64", "inference", "bfloat16") == "triton"


def test_measurements_of_other_kernels_are_refused_and_ignored(table, tmp_path, capsys):
    rows = [_row("snet_block2", "forward", "triton", 2.0), _row("snet_block2", "forward", "eager", 1.0)]
    assert writer.main([str(_results(tmp_path, "0" * 16, rows))]) == 2
    assert "measured other kernels" in capsys.readouterr().err and not table.exists()
    table.write_text(json.dumps({"fingerprint": "0" * 16, "entries": [
        {"family": "sm90", "op": "snet_block/cin=64", "mode": "inference", "dtype": "float32", "backend": "torch"}]}))
    assert configs.auto_choice("sm90", "snet_block/cin=64", "inference", "float32") == "triton"
