"""The launch policy (lfm_kernels/configs.py): one table, fitted tiles, pinned fp fusion, the launch observer."""
import importlib

import pytest
import torch
from utils import recorded_launches

from lfm import LFM
from lfm_kernels import configs


def test_every_launch_of_a_training_step_and_an_inference_passes_fp_fusion_explicitly():
    model = LFM(backend="triton")
    x = torch.randn(2, 3, 48, 48)
    with recorded_launches() as launches:
        model.train()(x).sum().backward()
        with torch.no_grad():
            model.eval()(x)
    assert len({launch.name for launch in launches}) >= 10
    for launch in launches:
        assert launch.meta["enable_fp_fusion"] is configs.FP_FUSION, launch.name
        assert {"num_warps", "num_stages"} <= set(launch.meta), launch.name


def test_launch_config_fits_tiles_to_extents_within_the_table_cap():
    table = configs._CONFIGS["snet_block"][("tf32", "*")]
    with configs.gpu_family("sm90"), configs.gpu_tile_sizes():
        small = configs.launch_config("snet_block", torch.device("cpu"), torch.float32, "tf32", BLOCK_CI=3,
                                      BLOCK_CO=40)
        large = configs.launch_config("snet_block", torch.device("cpu"), torch.float32, "tf32", BLOCK_CI=512,
                                      BLOCK_CO=512)
    # A conv's channel block: 4 (its 4 taps make tl.dot's least K of 16); a power of 2 covering 40.
    assert (small["BLOCK_CI"], small["BLOCK_CO"]) == (4, 64)
    assert (large["BLOCK_CI"], large["BLOCK_CO"]) == (table["BLOCK_CI"], table["BLOCK_CO"])
    assert large["BLOCK_M"] == table["BLOCK_M"] and large["num_stages"] == table["num_stages"]
    small["BLOCK_CO"] = 1  # a copy: the memoized entry stays as it was
    with configs.gpu_family("sm90"), configs.gpu_tile_sizes():
        again = configs.launch_config("snet_block", torch.device("cpu"), torch.float32, "tf32", BLOCK_CI=3,
                                      BLOCK_CO=40)
    assert again["BLOCK_CO"] == 64
    interpreter = configs.launch_config("snet_block", torch.device("cpu"), torch.float32, "tf32", BLOCK_CI=512,
                                        BLOCK_CO=512)
    assert interpreter["BLOCK_M"] == 1024 and interpreter["BLOCK_CO"] == 4 * table["BLOCK_CO"]


def test_tile_choices_replace_table_entries_and_launch_plans_follow():
    table = configs._CONFIGS["snet_block"][("tf32", "*")]
    chosen = {("snet_block", "tf32"): dict(BLOCK_M=64, BLOCK_CO=256, num_stages=4)}
    x, w = torch.empty(1, 64, 127, 127, device="meta"), torch.empty(128, 64, 2, 2, device="meta")
    bn = [torch.empty(128, device="meta") for _ in range(5)]
    metas = {}
    block = importlib.import_module("lfm_kernels.snet_block")
    for name, choices in (("table", None), ("chosen", chosen), ("table again", None)):
        with configs.gpu_family("sm90"), configs.gpu_tile_sizes(), configs.tile_choices(choices or {}):
            entry = configs.launch_config("snet_block", torch.device("cpu"), torch.float32, "tf32", BLOCK_CO=512)
            with configs.observe_launches(lambda launch: metas.setdefault(name, (launch.meta, launch.grid)), run=False):
                block.snet_block(x, w, *bn, backend="triton")  # a memoized plan, made again under each state
        assert entry["BLOCK_M"] == (64 if choices else table["BLOCK_M"])
        assert entry["BLOCK_CO"] == (256 if choices else table["BLOCK_CO"])
        assert entry["num_warps"] == table["num_warps"]  # not chosen: the table's
    assert metas["chosen"][0]["BLOCK_M"] == 64 and metas["chosen"][0]["num_stages"] == 4
    assert metas["table"] == metas["table again"] and metas["table"][0]["BLOCK_M"] == table["BLOCK_M"]
    assert metas["chosen"][1] != metas["table"][1]  # the grid follows the tiles
    assert ("snet_block", "tf32") in configs.configs_given()


def test_tuned_tiles_hold_only_over_the_table_entry_they_were_measured_against(monkeypatch):
    table = dict(configs._CONFIGS["snet_block"][("tf32", "*")])
    measured_over = configs.tunable(table)
    tuned = {("snet_block", "tf32"): ({"BLOCK_M": 64, "num_stages": 4}, measured_over)}
    monkeypatch.setattr(configs, "_chosen_tiles", lambda state: tuned)  # as bench.tune's table gives them on a GPU
    configs._launch_config.cache_clear()
    with configs.gpu_family("sm90"), configs.gpu_tile_sizes():
        entry = configs.launch_config("snet_block", torch.device("cpu"), torch.float32, "tf32")
        assert (entry["BLOCK_M"], entry["num_stages"]) == (64, 4)
        edited = {**table, "BLOCK_CI": 2 * table["BLOCK_CI"]}  # the table's entry changed since the measurement
        monkeypatch.setitem(configs._CONFIGS["snet_block"], ("tf32", "*"), edited)
        configs._launch_config.cache_clear()
        entry = configs.launch_config("snet_block", torch.device("cpu"), torch.float32, "tf32")
        assert (entry["BLOCK_M"], entry["num_stages"], entry["BLOCK_CI"]) == (table["BLOCK_M"], table["num_stages"],
                                                                             edited["BLOCK_CI"])
    configs._launch_config.cache_clear()


def test_stubbed_launches_run_nothing_and_observers_nest():
    op = importlib.import_module("lfm_kernels.npr_residual")  # the module: the package exports the function

    x = torch.randn(1, 2, 5, 6)
    outer, inner = [], []
    stubbed, ran = torch.full_like(x, 7.0), torch.full_like(x, 7.0)
    with configs.observe_launches(outer.append):
        with configs.observe_launches(inner.append, run=False):
            assert configs.launches_stubbed()
            op._launch(op._npr_residual_fwd_kernel, x, x, stubbed, factor=2, absolute=True)
        op._launch(op._npr_residual_fwd_kernel, x, x, ran, factor=2, absolute=True)
        with configs.observe_launches(run=False):  # no callback: a stub only
            op._launch(op._npr_residual_fwd_kernel, x, x, stubbed, factor=2, absolute=True)
    assert not configs.launches_stubbed()
    assert [launch.name for launch in outer] == ["_npr_residual_fwd_kernel"] * 3
    assert [launch.name for launch in inner] == ["_npr_residual_fwd_kernel"]
    assert torch.equal(stubbed, torch.full_like(x, 7.0))  # never written
    assert torch.equal(ran, op.npr_residual_reference(x.double(), 2, True).float())  # one rounding of the truth


def test_unknown_kernel_or_family_is_refused():
    with pytest.raises(KeyError, match="no_such_kernel"):
        configs.launch_config("no_such_kernel", torch.device("cpu"))
    with pytest.raises(ValueError, match="sm70"), configs.gpu_family("sm70"):
        pass
