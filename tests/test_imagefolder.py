"""Image folders (``--data imagefolder:DIR``) and normalization as an input (issue #12): tiny trees
written by the tests, PNG and JPEG, grayscale and RGB."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.core.errors import ConfigError, MissingFileError
from edgekd.data import load_dataset
from edgekd.data.normalize import IMAGENET, resolve_normalization
from edgekd.data.options import DataOptions
from tests.own_models import write_tree


def folder(path, **options):
    return load_dataset(f"imagefolder:{path}", seed=0, options=DataOptions(**options))


def test_png_grayscale_tree_without_val(tmp_path):
    write_tree(tmp_path / "t")
    data = folder(tmp_path / "t")
    assert data.classes == ["ant", "bee", "cat"] and data.input_shape == (1, 12, 12)
    assert len(data.test) == 12 and len(data.train) + len(data.val) == 36
    assert sorted(np.bincount(data.val.y)) == [1, 1, 1]  # a seeded, stratified tenth of train
    x = data.test.take([0, 5])
    assert x.shape == (2, 1, 12, 12) and x.dtype == np.float32
    assert abs(float(data.train.take(range(len(data.train))).mean())) < 0.05  # auto: train-split statistics
    assert data.meta["transform"]["normalize"] == {"mean": data.mean, "std": data.std}
    again = folder(tmp_path / "t")
    np.testing.assert_array_equal(again.val.y, data.val.y)
    assert again.val.files == data.val.files


def test_jpeg_rgb_tree_with_val_and_no_test(tmp_path):
    write_tree(tmp_path / "t", per_class={"train": 10, "val": 2}, rgb=True, fmt="jpg")
    data = folder(tmp_path / "t")
    assert data.input_shape == (3, 12, 12) and len(data.val) == 6
    assert len(data.test) == 6 and len(data.train) == 24  # test: a seeded, stratified fifth of train
    assert not set(data.test.files) & set(data.train.files)


def test_mixed_sizes_need_image_size_and_channels_can_be_forced(tmp_path):
    write_tree(tmp_path / "t", sizes=[10, 14, 20])
    with pytest.raises(ConfigError, match="3 different sizes") as e:
        folder(tmp_path / "t")
    assert "--image-size N" in e.value.one_line()
    data = folder(tmp_path / "t", image_size=8, channels=3)
    assert data.input_shape == (3, 8, 8) and data.test.take([0]).shape == (1, 3, 8, 8)
    assert data.meta["transform"]["center_crop"] == [8, 8]


def test_classes_must_agree_across_splits(tmp_path):
    write_tree(tmp_path / "t")
    (tmp_path / "t" / "test" / "bee").rename(tmp_path / "t" / "test" / "dog")
    with pytest.raises(ConfigError, match="missing bee; extra dog"):
        folder(tmp_path / "t")


def test_empty_class_and_missing_folders(tmp_path):
    write_tree(tmp_path / "t")
    (tmp_path / "t" / "train" / "dog").mkdir()
    with pytest.raises(ConfigError, match="dog holds no images"):
        folder(tmp_path / "t")
    with pytest.raises(MissingFileError, match="not found"):
        folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ConfigError, match="no train/ folder"):
        folder(tmp_path / "flat")


def _corrupt(tmp_path):
    write_tree(tmp_path / "t")
    bad = tmp_path / "t" / "train" / "bee" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    return bad


def test_corrupt_image_is_an_error_naming_it(tmp_path):
    _corrupt(tmp_path)
    with pytest.raises(ConfigError, match="3.png") as e:
        folder(tmp_path / "t")  # auto normalization decodes the training images
    assert "--skip-bad-images" in e.value.one_line()


def test_corrupt_image_met_by_a_worker_process_is_the_same_one_line_error(tmp_path):
    from edgekd.training.batches import LoaderBatches, batches_for

    bad = _corrupt(tmp_path)
    data = folder(tmp_path / "t", normalize="none", image_cache="off", workers=2)  # nothing decoded yet
    if str(bad) not in data.train.files:  # the seeded validation split took it
        data.train.files.append(str(bad))
        data.train.y = np.append(data.train.y, 1)
    source = batches_for(data.train, 8, False, 0, workers=2)
    assert isinstance(source, LoaderBatches)
    order = torch.arange(len(data.train))
    with pytest.raises(ConfigError) as e:
        for _ in source.epoch(order, 0, 1, torch.Generator().manual_seed(0), "cpu"):
            pass
    line = e.value.one_line()
    assert line.startswith(f"cannot read image {bad}") and "--skip-bad-images" in line and "\n" not in line


def test_corrupt_image_skipped_and_counted_also_from_worker_processes(tmp_path):
    from edgekd.training.batches import batches_for

    bad = _corrupt(tmp_path)
    data = folder(tmp_path / "t", skip_bad_images=True, workers=2)
    assert data.bad_images() == [str(bad)]  # met while computing the statistics
    data.train.bad.clear()
    source = batches_for(data.train, 8, False, 0, workers=2)
    order = torch.arange(len(data.train))
    seen = sum(len(b[0]) for b in source.epoch(order, 0, 1, torch.Generator().manual_seed(0), "cpu"))
    in_train = str(bad) in data.train.files
    assert seen == len(data.train) - in_train
    assert data.bad_images() == ([str(bad)] if in_train else [])  # recorded in this process


def test_training_transform_is_seeded_per_sample(tmp_path):
    write_tree(tmp_path / "t", size=16)
    data = folder(tmp_path / "t", image_size=12)
    rng = lambda: np.random.default_rng([0, 1, 3])  # noqa: E731  (seed, epoch, index)
    a, b = data.train.load(3, rng()), data.train.load(3, rng())
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 12, 12)
    assert data.meta["augment"] == "crop+flip" and data.flip_augment


@pytest.mark.parametrize("spec, channels, expected", [
    ("none", 3, ([0.0] * 3, [1.0] * 3)),
    ("imagenet", 3, IMAGENET),
    ("imagenet", 1, ([0.449], [0.226])),
    ("0.5,0.5,0.5/0.25,0.25,0.25", 3, ([0.5] * 3, [0.25] * 3)),
    ("0.1/0.2", 1, ([0.1], [0.2])),
])
def test_normalization_choices(spec, channels, expected):
    assert resolve_normalization(spec, channels, lambda: ([9.0], [9.0])) == tuple(map(list, expected))
    assert resolve_normalization("auto", 1, lambda: ([0.3], [0.2])) == ([0.3], [0.2])


@pytest.mark.parametrize("spec, message", [
    ("0.5,0.5/0.25,0.25", "2 means and 2 stds for 3-channel"),
    ("zscore", "auto, imagenet, none or MEAN/STD"),
    ("0.5,0.5,0.5/0,1,1", "> 0"),
    ("nan,0,0/1,1,1", "finite"),
])
def test_bad_normalization(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_normalization(spec, 3, lambda: ([0.0] * 3, [1.0] * 3))


def test_normalization_applies_to_arrays_in_memory_and_folders(tmp_path, digits):
    raw = load_dataset("digits", options=DataOptions(normalize="none"))
    assert (raw.mean, raw.std) == ([0.0], [1.0]) and float(raw.train.x.max()) == 1.0
    assert raw.options.record()["normalize"] == "none"
    write_tree(tmp_path / "t", rgb=True)
    data = folder(tmp_path / "t", normalize="imagenet")
    assert (data.mean, data.std) == IMAGENET


def test_folder_options_are_refused_for_arrays_in_memory():
    with pytest.raises(ConfigError, match="--image-size applies to image folders"):
        load_dataset("digits", options=DataOptions(image_size=8))
    with pytest.raises(ConfigError, match="crop\\+flip"):
        load_dataset("digits", options=DataOptions(augment="crop+flip"))
    assert load_dataset("digits", options=DataOptions(augment="flip")).flip_augment
