"""Scoring an image of any size in bounded memory: LFM's Top-K computed in tiles of the input gives the
untiled model's scores, positions, logits and heatmaps."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from utils import NETWORK_FLOOR, assert_as_accurate

import lfm.inference
from lfm import LFM
from lfm.cli import main
from lfm.heatmap import topk_heat
from lfm.images import normalize_pixels
from lfm.inference import lfm_topk, logits_of
from lfm.model import snet_output_size


@pytest.fixture(scope="module")
def models():
    """A random LFM (seed 0) in eval mode, and the same weights in float64 (the truth)."""
    torch.manual_seed(0)
    model = LFM(k=4).eval()
    truth = LFM(k=4).eval()
    truth.load_state_dict(model.state_dict())
    return model, truth.double()


def _pixels(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=g)


def _record_tiles(monkeypatch):
    """Record the input size of every trunk call."""
    from lfm.model import SNet

    sizes, trunk = [], SNet.trunk

    def recording(self, x):
        sizes.append(tuple(x.shape[2:]))
        return trunk(self, x)

    monkeypatch.setattr(SNet, "trunk", recording)
    return sizes


@pytest.mark.parametrize("h, w, max_pixels", [
    (143, 111, 40 * 40),   # 16 x 12 positions in blocks of 3 x 3: edge blocks narrower than K = 4 positions
    (100, 87, 31 * 31),    # blocks of 2 x 2 positions, odd sizes
    (47, 400, 60 * 60),    # one row of positions: full-height blocks along a wide image
    (47, 63, 23 * 23),     # one position per block
])
def test_tiles_give_the_untiled_topk_logits_and_positions(models, h, w, max_pixels, monkeypatch):
    model, truth = models
    x = _pixels(h, w)
    with torch.no_grad():
        true_values, true_positions = lfm_topk(truth, normalize_pixels(x).double(), max_pixels=h * w)
        true_logits = truth(normalize_pixels(x).double())
        whole_values, whole_positions = lfm_topk(model, x, max_pixels=h * w)
        whole_logits = model(normalize_pixels(x))
        sizes = _record_tiles(monkeypatch)
        values, positions = lfm_topk(model, x, max_pixels=max_pixels)
        logits = model.fc1(values.flatten(1))
    assert len(sizes) > 1 and all(th * tw <= max_pixels for th, tw in sizes)
    assert torch.equal(positions, true_positions) and torch.equal(whole_positions, true_positions)
    # The tiles against the float64 truth, as accurate as the untiled model.
    assert_as_accurate(values, whole_values, true_values, "Top-K values", norm=True)
    assert_as_accurate(logits, whole_logits, true_logits, "logits", floor=NETWORK_FLOOR)


@pytest.mark.parametrize("block", [(1, 1), (2, 3), (3, 2), (5, 7)])
def test_blocks_merge_into_the_top_k_of_the_whole_grid(block):
    """Few distinct values (ties everywhere, -0.0 beside 0.0) and NaN: the merged Top-K of the blocks' Top-K
    is the reference Top-K of the whole map, values and positions (ties to the lower position)."""
    from lfm.inference import _tile_spans, merge_topk
    from lfm_kernels import topk_pool_reference

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-2, 3, (2, 3, 7, 9), generator=g).float()
    scores[0, 0, 6, 8] = scores[1, 2, 3, 4] = float("nan")
    scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    k = 5
    values, positions = [], []
    for top, bottom in _tile_spans(7, block[0]):
        for left, right in _tile_spans(9, block[1]):
            part = scores[:, :, top:bottom, left:right]
            v, i = topk_pool_reference(part, min(k, part.shape[2] * part.shape[3]), return_indices=True)
            values.append(v)
            positions.append((top + i // (right - left)) * 9 + left + i % (right - left))
    merged_values, merged_positions = merge_topk(values, positions, k)
    true_values, true_positions = topk_pool_reference(scores, k, return_indices=True)
    assert torch.equal(merged_positions, true_positions)
    assert torch.equal(merged_values.nan_to_num(7.0), true_values.nan_to_num(7.0))


def test_heatmaps_from_tiles_are_the_untiled_ones(models, monkeypatch):
    model, _ = models
    x = _pixels(143, 111, seed=3)
    whole = topk_heat(model, x)
    monkeypatch.setattr(lfm.inference, "FORWARD_PIXELS", 40 * 40)
    sizes = _record_tiles(monkeypatch)
    tiled = topk_heat(model, x)
    assert len(sizes) > 1 and np.array_equal(tiled, whole)
    h, w = snet_output_size(143, 111)
    assert tiled.sum() == 64 * model.k * 23 * 23 and tiled.shape == (143, 111)


def test_large_images_are_scored_in_tiles_automatically(models, tmp_path, capsys, monkeypatch):
    model, truth = models
    from lfm.weights import save_weights

    save_weights(model, tmp_path / "w.safetensors", {"model": "lfm", "k": 4})
    x = _pixels(143, 111, seed=5)
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(tmp_path / "big.png")
    with torch.no_grad():
        true_logits = truth(normalize_pixels(x).double())
        whole_logits = model(normalize_pixels(x))
    monkeypatch.setattr(lfm.inference, "FORWARD_PIXELS", 50 * 50)
    sizes = _record_tiles(monkeypatch)
    args = ["predict", "--weights", str(tmp_path / "w.safetensors"), str(tmp_path / "big.png"), "--no-resize",
            "--workers", "0", "--json"]
    assert main(args) == 0
    prob = torch.tensor([[json.loads(capsys.readouterr().out)["prob_fake"]]], dtype=torch.float64)
    assert len(sizes) > 1 and all(th * tw <= 50 * 50 for th, tw in sizes)
    assert_as_accurate(prob, torch.sigmoid(whole_logits), torch.sigmoid(true_logits), "probability",
                       floor=NETWORK_FLOOR)
    with torch.no_grad():  # the engines' path, any model: as accurate as the model's untiled forward
        assert_as_accurate(logits_of(model, x), whole_logits, true_logits, "logits", floor=NETWORK_FLOOR)


@pytest.mark.parametrize("band_pixels", [111 * 1, 111 * 7, 111 * 30])
def test_heat_made_in_bands_is_the_whole_heat(models, band_pixels, monkeypatch):
    """Each band of rows holds exactly the rows of the heat spread over the whole image at once, and the
    overlay of the banded heat is the overlay of the whole one."""
    import torch.nn.functional as F

    import lfm.heatmap
    from lfm.heatmap import RECEPTIVE_FIELD, STRIDE, TopKHeat, overlay

    model, _ = models
    x = _pixels(143, 111, seed=7)
    heat = TopKHeat.of(model, x)
    spread = F.conv_transpose2d(heat.hits, torch.ones(1, 1, RECEPTIVE_FIELD, RECEPTIVE_FIELD), stride=STRIDE)[0, 0]
    whole = torch.zeros(143, 111)
    whole[:spread.shape[0], :spread.shape[1]] = spread
    monkeypatch.setattr(lfm.heatmap, "BAND_PIXELS", band_pixels)
    step = band_pixels // 111
    bands = [heat.rows(top, min(143, top + step)) for top in range(0, 143, step)]
    assert np.array_equal(np.concatenate(bands), whole.numpy()) and heat.peak() == whole.max()
    img = Image.fromarray(x[0].permute(1, 2, 0).numpy())
    assert np.array_equal(np.asarray(overlay(img, heat)), np.asarray(overlay(img, whole.numpy())))
