"""Image reading, preprocessing and dataset discovery."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import write_labeled

from lfm.data import (
    ImageDataset,
    Item,
    collate_samples,
    expand_paths,
    find_test_subsets,
    labeled_folders,
    training_items,
)
from lfm.errors import UsageError
from lfm.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    ImageTooLarge,
    TrainTransform,
    UnusableImage,
    read_rgb,
    to_rgb,
)
from lfm.train import TrainOptions


def _augmentation(**options) -> TrainTransform:
    """The training transform of a run with these options (the rest at their defaults)."""
    return TrainTransform.from_options(TrainOptions(data="unused", **options))


def _png(img: Image.Image, tmp_path, name="x.png"):
    path = tmp_path / name
    img.save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------
def test_gray_palette_rgba_cmyk_become_rgb():
    gray = Image.fromarray(np.array([[0, 128], [200, 255]], dtype=np.uint8), mode="L")
    assert np.array_equal(np.asarray(to_rgb(gray)), np.repeat(np.asarray(gray)[..., None], 3, axis=2))

    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], dtype=np.uint8), mode="RGBA")
    # As the authors' convert('RGB'): alpha is dropped, not composited over a background.
    assert np.array_equal(np.asarray(to_rgb(rgba)), [[[10, 20, 30], [40, 50, 60]]])

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    palette.info["transparency"] = 0
    assert np.array_equal(np.asarray(to_rgb(palette)), [[[255, 0, 0], [0, 0, 255]]])

    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    assert np.array_equal(np.asarray(to_rgb(cmyk)), [[[255, 0, 0]]])


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    expected = [0, 1, 128, 255]
    for img in (Image.fromarray(values), Image.fromarray(values.astype(np.int32))):  # modes I;16 and I
        assert np.asarray(to_rgb(img))[0, :, 0].tolist() == expected
    for suffix in ("png", "tif"):  # 16-bit files
        path = _png(Image.fromarray(values), tmp_path, f"x.{suffix}")
        assert np.asarray(read_rgb(path))[0, :, 1].tolist() == expected


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------
def test_unreadable_files_raise_unusable_image(tmp_path):
    good = _png(Image.new("RGB", (64, 64), (1, 2, 3)), tmp_path)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path in (truncated, text, empty):
        with pytest.raises(UnusableImage):
            read_rgb(path)
    assert read_rgb(good).size == (64, 64)


def test_images_above_the_pixel_limit_are_refused(tmp_path):
    path = _png(Image.new("RGB", (40, 30)), tmp_path)
    with pytest.raises(ImageTooLarge, match="1200 pixels is above the limit of 1199"):
        read_rgb(path, max_pixels=1199)
    assert read_rgb(path, max_pixels=1200).size == (40, 30)


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------
def test_eval_transform_is_the_authors_test_pipeline():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    # The authors: transforms.Resize((256, 256)) on PIL (bilinear), ToTensor, Normalize.
    resized = np.array(img.resize((256, 256), Image.BILINEAR))
    expected = (torch.from_numpy(resized).permute(2, 0, 1).float().div(255) - IMAGENET_MEAN) / IMAGENET_STD
    assert torch.equal(EvalTransform()(img), expected)
    assert EvalTransform(resize=None)(img).shape == (3, 37, 53)
    assert EvalTransform(resize=None, crop=30)(img).shape == (3, 30, 30)


def test_train_transform_is_seeded_by_its_rng():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    augment = _augmentation(resize=60, crop=48, blur_prob=0.5, jpeg_prob=0.5)
    first = augment(img, np.random.default_rng((0, 0, 5)))
    assert first.shape == (3, 48, 48)
    assert torch.equal(first, augment(img, np.random.default_rng((0, 0, 5))))
    others = [augment(img, np.random.default_rng((0, epoch, 5))) for epoch in range(1, 6)]
    assert not all(torch.equal(first, other) for other in others)


def test_train_transform_flip_and_crop_take_pixels_from_the_image():
    array = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    img = Image.fromarray(array)
    plain = EvalTransform(resize=None)(img)
    seen = set()
    for seed in range(20):
        out = _augmentation(resize=None, crop=6)(img, np.random.default_rng(seed))
        matches = [(top, left, flip) for top in range(3) for left in range(3) for flip in (False, True)
                   if torch.equal(out, (plain[:, top:top + 6, left:left + 6].flip(2) if flip
                                        else plain[:, top:top + 6, left:left + 6]))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert {flip for _, _, flip in seen} == {False, True} and len(seen) > 5


def test_crop_larger_than_the_image_is_an_unusable_image():
    with pytest.raises(UnusableImage, match="smaller than the crop size 48"):
        _augmentation(resize=None, crop=48)(Image.new("RGB", (40, 60)), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------
def test_training_items_by_class_and_flat(tmp_path):
    rng = np.random.default_rng(0)
    write_labeled(tmp_path / "classes" / "train" / "car", 2, 3, rng)
    write_labeled(tmp_path / "classes" / "train" / "cat", 1, 1, rng)
    write_labeled(tmp_path / "flat" / "train", 2, 2, rng)
    items = training_items(tmp_path / "classes", "train")
    assert [item.label for item in items] == [0, 0, 1, 1, 1, 0, 1]
    assert len(training_items(tmp_path / "classes", "train", ["cat"])) == 2
    assert len(training_items(tmp_path / "flat", "train")) == 4
    with pytest.raises(UsageError, match="no val folder"):
        training_items(tmp_path / "flat", "val")
    with pytest.raises(UsageError, match="does not hold 0_real or 1_fake"):
        training_items(tmp_path / "classes", "train", ["dog"])
    (tmp_path / "empty" / "train" / "0_real").mkdir(parents=True)
    with pytest.raises(UsageError, match="empty dataset"):
        training_items(tmp_path / "empty", "train")
    (tmp_path / "unlabeled" / "train" / "pictures").mkdir(parents=True)
    with pytest.raises(UsageError, match="no 0_real or 1_fake folder"):
        training_items(tmp_path / "unlabeled", "train")


def test_test_subsets_are_labeled_folders(tmp_path):
    rng = np.random.default_rng(0)
    for path in ("progan/car", "progan/cat", "stylegan", "deep/a/b"):
        write_labeled(tmp_path / "test" / path, 1, 1, rng)
    subsets = find_test_subsets([tmp_path / "test"])
    assert list(subsets) == ["deep/a/b", "progan/car", "progan/cat", "stylegan"]
    merged = find_test_subsets([tmp_path / "test"], depth=1)
    assert {name: len(items) for name, items in merged.items()} == {"deep": 2, "progan": 4, "stylegan": 2}
    assert list(find_test_subsets([tmp_path / "test" / "stylegan"])) == ["stylegan"]
    both = find_test_subsets([tmp_path / "test" / "stylegan", tmp_path / "test" / "progan"])
    assert list(both) == ["stylegan", "progan/car", "progan/cat"]
    assert labeled_folders(tmp_path / "test" / "progan") == [tmp_path / "test" / "progan" / n for n in ("car", "cat")]
    with pytest.raises(UsageError, match="no such folder"):
        find_test_subsets([tmp_path / "missing"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="plain fits none of the layouts tried: cnndetection"):
        find_test_subsets([tmp_path / "plain"])


def _sizes(subsets):
    return {name: (sum(i.label == 0 for i in items), sum(i.label == 1 for i in items))
            for name, items in subsets.items()}


def test_genimage_layout_scores_the_val_split_of_each_generator(tmp_path):
    adm = "GenImage/adm/imagenet_ai_0508_adm"
    for folder, n in ((f"{adm}/val/ai", 2), (f"{adm}/val/nature", 1), (f"{adm}/train/ai", 5),
                      ("GenImage/vqdm/val/ai", 1), ("GenImage/vqdm/val/nature", 3)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(n):
            (tmp_path / folder / f"{i}.png").write_bytes(b"not read while finding subsets")
    root = tmp_path / "GenImage"
    assert _sizes(find_test_subsets([root])) == {"adm/imagenet_ai_0508_adm": (1, 2), "vqdm": (3, 1)}
    assert _sizes(find_test_subsets([root], depth=1, layout="genimage")) == {"adm": (1, 2), "vqdm": (3, 1)}
    assert _sizes(find_test_subsets([root / "vqdm"])) == {"vqdm": (3, 1)}  # a generator folder as the root
    with pytest.raises(UsageError, match="GenImage fits none of the layouts tried: cnndetection"):
        find_test_subsets([root], layout="cnndetection")
    # A root holding both layouts must be named.
    write_labeled(root / "extra", 1, 1, np.random.default_rng(0))
    with pytest.raises(UsageError, match=r"fits several layouts \(cnndetection, genimage\); name one with --layout"):
        find_test_subsets([root])
    assert _sizes(find_test_subsets([root], layout="cnndetection")) == {"extra": (1, 1)}


def test_csv_list_layout(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "images" / name).write_bytes(b"x")
    listing = tmp_path / "lists" / "set.csv"
    listing.parent.mkdir()
    listing.write_text(f"../images/a.png,0\n../images/b.png,fake\n{tmp_path / 'images' / 'c.png'},Real\n\n")
    subsets = find_test_subsets([listing])
    assert list(subsets) == ["set"]  # no subset column: named after the list
    assert [(item.path.name, item.label) for item in subsets["set"]] == [("a.png", 0), ("b.png", 1), ("c.png", 0)]
    listing.write_text("path,label,subset\n../images/a.png,0,gan/x\n../images/b.png,1,gan/y\n../images/c.png,1,gan/x\n")
    assert _sizes(find_test_subsets([listing])) == {"gan/x": (1, 1), "gan/y": (0, 1)}
    assert _sizes(find_test_subsets([listing], depth=1)) == {"gan": (1, 2)}
    for text, message in (("../images/a.png,2\n", "set.csv line 1: expected path,label\\[,subset\\] with label 0, 1, "
                                                   "real or fake, got '../images/a.png,2'"),
                          ("../images/a.png,0\n../images/nope.png,1\n", "set.csv line 2: no such file: "),
                          ("../images/a.png\n", "line 1: expected path,label")):
        listing.write_text(text)
        with pytest.raises(UsageError, match=message):
            find_test_subsets([listing])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="notes.txt is not a folder \\(nor a .csv list\\)"):
        find_test_subsets([tmp_path / "notes.txt"])


def test_expand_paths_files_folders_globs(tmp_path):
    for name in ("b.png", "a.jpg", "sub/c.png", ".hidden.png", "sub/.git/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert expand_paths([tmp_path]) == [tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "sub" / "c.png"]
    assert expand_paths([str(tmp_path / "**" / "*.png")]) == [tmp_path / "b.png", tmp_path / "sub" / "c.png"]
    assert expand_paths([tmp_path / "b.png", tmp_path / "a.jpg"]) == [tmp_path / "b.png", tmp_path / "a.jpg"]
    with pytest.raises(UsageError, match="no such file or folder"):
        expand_paths([tmp_path / "nope.png"])
    with pytest.raises(UsageError, match="no file matches"):
        expand_paths([str(tmp_path / "*.gif")])


def test_dataset_reports_failures_and_collate_groups_sizes(tmp_path):
    paths = [_png(Image.new("RGB", (50, 50)), tmp_path, "a.png"), _png(Image.new("RGB", (60, 50)), tmp_path, "b.png"),
             tmp_path / "bad.png", _png(Image.new("L", (50, 50)), tmp_path, "c.png")]
    paths[2].write_text("nope")
    dataset = ImageDataset([Item(p, i % 2) for i, p in enumerate(paths)], EvalTransform(resize=None))
    batch = collate_samples([dataset[i] for i in range(4)])
    assert [(tuple(images.shape), indices.tolist()) for images, _, indices in batch.groups] == [
        ((2, 3, 50, 50), [0, 3]), ((1, 3, 50, 60), [1])]
    assert batch.groups[0][1].tolist() == [0, 1]
    assert len(batch.failures) == 1 and batch.failures[0][0] == 2 and "not a readable image" in batch.failures[0][1]


def test_png_bytes_roundtrip_through_read_rgb(tmp_path):
    buffer = io.BytesIO()
    Image.new("LA", (3, 2), (100, 7)).save(buffer, format="PNG")
    path = tmp_path / "la.png"
    path.write_bytes(buffer.getvalue())
    assert np.asarray(read_rgb(path)).tolist() == [[[100] * 3] * 3] * 2


def test_globs_and_folders_survive_symlink_loops_and_score_each_file_once(tmp_path):
    loop = tmp_path / "L"
    (loop / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        (loop / name).write_bytes(b"x")
    (loop / "self").symlink_to(".")
    (loop / "parent").symlink_to("../L")
    (loop / "sub" / "up").symlink_to("..")
    (loop / "alias.png").symlink_to("a.png")
    expected = [loop / "a.png", loop / "sub" / "b.png"]
    assert expand_paths([str(loop / "**" / "*.png")]) == expected
    assert expand_paths([loop]) == expected
    assert expand_paths([loop / "a.png", loop, str(loop / "*.png")]) == expected  # each real file once
    # A symlink to a folder outside is followed (once).
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "c.png").write_bytes(b"x")
    (loop / "linked").symlink_to(tmp_path / "outside")
    assert expand_paths([str(loop / "**" / "c.png")]) == [loop / "linked" / "c.png"]


def test_only_regular_files_and_folders_are_inputs(tmp_path):
    with pytest.raises(UsageError, match="not a regular file or folder: /dev/null"):
        expand_paths(["/dev/null"])


def test_test_subsets_have_unique_names_and_nested_sets_are_kept(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for path in ("a/test/gan", "b/test/gan", "outer", "outer/inner"):
        write_labeled(tmp_path / path, 1, 1, rng)
    # Two roots named "test": their subsets keep apart.
    subsets = find_test_subsets([tmp_path / "a" / "test", tmp_path / "b" / "test"])
    assert {name: len(items) for name, items in subsets.items()} == {"a/test/gan": 2, "b/test/gan": 2}
    # The same root twice counts once.
    twice = find_test_subsets([tmp_path / "a" / "test", tmp_path / "a" / "test" / ".." / "test"])
    assert {name: len(items) for name, items in twice.items()} == {"gan": 2}
    # A labeled folder inside another is a subset of its own, with a warning.
    nested = find_test_subsets([tmp_path / "outer"])
    assert {name: len(items) for name, items in nested.items()} == {"outer": 2, "inner": 2}
    assert "outer/inner holds 0_real/1_fake inside the labeled folder" in capsys.readouterr().err
    with pytest.raises(UsageError, match="lies inside"):
        find_test_subsets([tmp_path / "a", tmp_path / "a" / "test"])


def test_training_blur_and_jpeg_are_the_test_perturbations():
    from lfm.perturb import Perturbation

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    for seed in range(4):
        rng = np.random.default_rng(seed)
        rng.random()  # the blur draw
        sigma = rng.uniform(0.5, 2.0)
        expected = EvalTransform(None, None, Perturbation("blur", sigma))(img)
        blurred = _augmentation(resize=None, crop=None, flip=False, blur_prob=1, blur_sigma=(0.5, 2.0))
        assert torch.equal(blurred(img, np.random.default_rng(seed)), expected)

        rng = np.random.default_rng(seed)
        rng.random(), rng.random()  # the blur and JPEG draws
        quality = int(rng.integers(40, 91))
        expected = EvalTransform(None, None, Perturbation("jpeg", quality))(img)
        compressed = _augmentation(resize=None, crop=None, flip=False, jpeg_prob=1, jpeg_quality=(40, 90))
        assert torch.equal(compressed(img, np.random.default_rng(seed)), expected)
