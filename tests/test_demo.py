"""The demo's data (photos, generators, layout), a tiny end-to-end run, and the same numbers on every
instruction set."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lfm.demo import (
    CROP_SIZE,
    GENERATORS,
    HELD_OUT_GENERATORS,
    PHOTO_SOURCES,
    TRAIN_GENERATORS,
    as_rgb,
    box_downscale,
    build_dataset,
    high_frequency_energy,
    make_fake,
    random_crops,
    run_demo,
)

ROOT = Path(__file__).resolve().parents[1]
# The instruction sets a CPU may offer, as ATen, oneDNN and MKL pick them: AVX2 only, and none (scalar
# code); the machine's own (AVX-512 here) runs with no variable set.
INSTRUCTION_SETS = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def _run_python(code: str, env: dict, threads: int = 2) -> str:
    """Run `code` in a fresh interpreter (the variables take effect at start-up only); its stdout."""
    env = {**os.environ, **env, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _residual_energy(image: np.ndarray, offset: int) -> float:
    """Mean squared NPR residual on the 2x2 grid that starts at (offset, offset)."""
    x = image.astype(np.float64)[offset:, offset:]
    x = x[:x.shape[0] // 2 * 2, :x.shape[1] // 2 * 2]
    anchors = x[::2, ::2].repeat(2, axis=0).repeat(2, axis=1)
    return float(((x - anchors) ** 2).mean())


def test_box_downscale_averages_2x2_blocks():
    image = np.array([[0, 2, 9], [4, 6, 9], [9, 9, 9]], dtype=np.uint8)[..., None].repeat(3, axis=2)
    assert box_downscale(image)[..., 0].tolist() == [[3]]


@pytest.mark.parametrize("generator", list(GENERATORS))
def test_generators_double_the_size_and_are_seeded(generator):
    crop = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    fake = make_fake(crop, generator, np.random.default_rng(1))
    assert fake.shape == crop.shape and fake.dtype == np.uint8
    assert np.array_equal(fake, make_fake(crop, generator, np.random.default_rng(1)))
    flat = make_fake(np.full((16, 16, 3), 100, np.uint8), generator, np.random.default_rng(2))
    if generator == "zero_insert_blur":  # its trace: the 2x2 phases of the blur have slightly different gains
        assert np.abs(flat.astype(int) - 100).max() <= 8 and flat.std() > 0
    else:  # every other generator keeps a flat image flat: its trace is in the filter shape only
        assert np.array_equal(flat, np.full_like(flat, 100))


def test_generators_leave_a_2x2_trace_the_photos_do_not_have():
    rng = np.random.default_rng(0)
    photo = box_downscale(PHOTO_SOURCES["astronaut"]()[0])
    crop = photo[100:164, 100:164]
    assert _residual_energy(make_fake(crop, "nearest", rng), 0) == 0
    ratio = {g: _residual_energy(make_fake(crop, g, rng), 0) / _residual_energy(make_fake(crop, g, rng), 1)
             for g in ("bilinear", "pixel_shuffle")}
    real = _residual_energy(crop, 0) / _residual_energy(crop, 1)
    assert 0.8 < real < 1.25 and all(r < 0.8 for r in ratio.values())


def _photo_crops(count=40):
    rng = np.random.default_rng(0)
    photos = [box_downscale(as_rgb(np.asarray(photo))) for name in ("astronaut", "coffee", "brick", "grass")
              for photo in PHOTO_SOURCES[name]()]
    return random_crops(photos, count, CROP_SIZE, rng), rng


def test_sharp_patch_fakes_hold_as_much_detail_as_the_reals():
    crops, rng = _photo_crops()
    detail = {g: np.mean([high_frequency_energy(make_fake(c, g, rng)) for c in crops]) for g in GENERATORS}
    real = np.mean([high_frequency_energy(c) for c in crops])
    assert all(detail[g] < 0.6 * real for g in GENERATORS if g != "sharp_patch")  # re-upsampled: blurrier
    assert detail["sharp_patch"] >= 0.95 * real


def test_sharp_patch_changes_one_even_square_of_half_the_side():
    crops, rng = _photo_crops(10)
    for crop in crops:
        changed = np.argwhere((make_fake(crop, "sharp_patch", rng) != crop).any(axis=2))
        top, left = changed.min(axis=0)
        bottom, right = changed.max(axis=0) + 1
        assert bottom - top <= CROP_SIZE // 2 and right - left <= CROP_SIZE // 2
        assert len(changed) > CROP_SIZE ** 2 // 8  # most of the square's pixels


def _tiny_sources(n=11, size=140):
    rng = np.random.default_rng(0)
    images = {f"photo{i:02d}": rng.integers(0, 256, (size, size + 10 * i, 3), dtype=np.uint8) for i in range(n)}
    return {name: (lambda image=image: [image]) for name, image in images.items()}


def test_build_dataset_layout_and_split_by_photo(tmp_path):
    splits = build_dataset(tmp_path, crops_per_photo=3, seed=0, sources=_tiny_sources())
    photos = {split: set(names) for split, names in splits.items()}
    assert sum(map(len, photos.values())) == 11
    assert not (photos["train"] & photos["val"] | photos["train"] & photos["test"])
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == sorted(GENERATORS)
    for split in ("train", "val"):
        reals, fakes = (sorted((tmp_path / split / label).iterdir()) for label in ("0_real", "1_fake"))
        assert len(reals) == len(fakes) == 3 * len(photos[split])
        assert {p.name.split("_")[0] for p in reals} == photos[split]
        assert {p.stem.split("_", 2)[2] for p in fakes} <= set(TRAIN_GENERATORS)
    real_sets = []
    for generator in GENERATORS:
        reals = sorted((tmp_path / "test" / generator / "0_real").iterdir())
        assert len(reals) == len(list((tmp_path / "test" / generator / "1_fake").iterdir())) == 3 * len(photos["test"])
        real_sets.append([p.read_bytes() for p in reals])
    assert all(s == real_sets[0] for s in real_sets)  # the same real crops in every test subset
    for path in tmp_path.rglob("*.png"):
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (CROP_SIZE, CROP_SIZE))


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    results = run_demo(out=tmp_path, epochs=1, crops_per_photo=2, progress=False)
    out = capsys.readouterr().out
    assert list(results) == ["lfm", "lfm-gap", "npr"]
    assert all(set(rows) == set(GENERATORS) | {"mean"} for rows in results.values())
    assert "generator (* held out)" in out and all(f"{g}*" in out for g in HELD_OUT_GENERATORS)
    assert (tmp_path / "results.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["npr"]["mean"]["acc"] == results["npr"]["mean"]["acc"]  # JSON keeps a float exactly
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 3 * (len(GENERATORS) + 1)
    # The parameter counts of the three architectures (LFM's head: 64 x 16 + 1; its GAP ablation: 64 + 1)
    assert [saved["speed"][m]["parameters"] for m in results] == [725_641, 724_681, 1_437_761]
    assert all(saved["speed"][m]["test_images_per_s"] > 0 for m in results) and "train img/s" in out


def test_the_demo_data_is_the_same_on_every_instruction_set():
    """The fakes round to uint8: computed in float32 they would round differently where kernels differ."""
    code = ("import hashlib, tempfile, pathlib; from lfm.demo import build_dataset\n"
            "with tempfile.TemporaryDirectory() as root:\n"
            "    build_dataset(pathlib.Path(root), crops_per_photo=2, seed=0)\n"
            "    files = sorted(pathlib.Path(root).rglob('*.png'))\n"
            "    print(len(files), hashlib.sha256(b''.join(f.read_bytes() for f in files)).hexdigest())")
    digests = {name: _run_python(code, env) for name, env in {"machine": {}, **INSTRUCTION_SETS}.items()}
    assert len(set(digests.values())) == 1, digests


@pytest.mark.slow
def test_demo_table_is_the_same_on_every_instruction_set_and_thread_count(tmp_path):
    code = ("import sys; from lfm.demo import demo_table, run_demo\n"
            "print(demo_table(run_demo(out=sys.argv[1], epochs=1, crops_per_photo=3, progress=False, "
            "log=lambda *a: None)))")
    runs = {"machine, 2 threads": ({}, 2), "machine, 1 thread": ({}, 1),
            **{f"{name}, 2 threads": (env, 2) for name, env in INSTRUCTION_SETS.items()}}
    tables = {label: _run_python(code.replace("sys.argv[1]", repr(str(tmp_path / str(i)))), env, threads)
              for i, (label, (env, threads)) in enumerate(runs.items())}
    assert len(set(tables.values())) == 1, "\n".join(f"{label}:\n{table}" for label, table in tables.items())
