"""backend="auto" on a GPU follows the latest GPU run's measurements (bench/auto_backend.py ->
lfm_kernels/auto_backend.json -> configs.auto_choice): of these kernels, or, taken explicitly, of earlier
kernels, whose "slower" stands until these are measured."""
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


def test_measurements_of_other_kernels_are_refused_unless_taken_as_the_latest_evidence(table, tmp_path, capsys):
    rows = [_row("snet_block2", "forward", "triton", 2.0), _row("snet_block2", "forward", "eager", 1.0),
            _row("npr_residual", "forward", "triton", 1.0), _row("npr_residual", "forward", "eager", 3.0)]
    earlier = _results(tmp_path, "0" * 16, rows)
    assert writer.main([str(earlier)]) == 2
    assert "measured other kernels" in capsys.readouterr().err and not table.exists()
    assert writer.main([str(earlier), "--earlier-kernels"]) == 0
    assert json.loads(table.read_text())["measured_fingerprints"] == ["0" * 16]
    configs._auto_table.cache_clear()
    assert configs.auto_choice("sm90", "snet_block/cin=64", "inference", "float32") == "torch"
    assert configs.auto_choice("sm90", "npr_residual", "inference", "float32") == "triton"


def test_a_new_run_replaces_what_it_measured_and_keeps_earlier_evidence(table, tmp_path):
    earlier = [_row("snet_block2", "forward", "triton", 2.0), _row("snet_block2", "forward", "eager", 1.0),
               _row("snet_head", "forward", "triton", 2.0), _row("snet_head", "forward", "eager", 1.0)]
    assert writer.main([str(_results(tmp_path, "0" * 16, earlier)), "--earlier-kernels"]) == 0
    now = [_row("snet_head", "forward", "triton", 0.5), _row("snet_head", "forward", "eager", 1.0)]  # a cut-short run
    assert writer.main([str(_results(tmp_path, configs.kernels_fingerprint(), now))]) == 0
    configs._auto_table.cache_clear()
    assert configs.auto_choice("sm90", "snet_head", "inference", "float32") == "triton"  # measured again: faster
    assert configs.auto_choice("sm90", "snet_block/cin=64", "inference", "float32") == "torch"  # not: still slower
    written = json.loads(table.read_text())
    assert written["measured_fingerprints"] == sorted(["0" * 16, configs.kernels_fingerprint()])
    assert len(written["entries"]) == 2


def test_the_committed_table_keeps_the_composition_where_the_last_gpu_run_measured_ours_slower():
    # The H200 run of 2026-12-04 (bench/results/) measured earlier kernels: blocks 2-4 and the head slower than
    # cuDNN, the NPR residual and the stem's inference faster. Until these kernels are measured, auto follows it.
    configs._auto_table.cache_clear()
    assert configs.AUTO_TABLE.exists()
    for op in ("snet_block/cin=64", "snet_block/cin=128", "snet_block/cin=256", "snet_head"):
        for mode in ("inference", "training"):
            assert configs.auto_choice("sm90", op, mode, "float32") == "torch", (op, mode)
    assert configs.auto_choice("sm90", "npr_residual", "inference", "float32") == "triton"
    assert configs.auto_choice("sm90", "snet_block/cin=3", "inference", "bfloat16") == "triton"
    assert configs.auto_choice("sm80", "snet_head", "inference", "float32") == "triton"  # nothing measured there
