"""The decoded-image cache of image folders (``--image-cache``, data.decoded): cached pixels are the
decoded ones bit for bit, a cache is found again and never read stale, unreadable files stop (or are
counted) when it is built, and training and evaluation read it like arrays in memory."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from edgekd.core.errors import ConfigError
from edgekd.data import decoded, load_dataset
from edgekd.data.builtin import Split
from edgekd.data.options import DataOptions
from edgekd.training import evaluate
from edgekd.training.batches import CachedBatches, LoaderBatches, MemoryBatches, batches_for
from tests.own_models import write_tree


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def folder(path, **options):
    return load_dataset(f"imagefolder:{path}", seed=0, options=DataOptions(**options))


@pytest.mark.parametrize("tree, options", [
    (dict(rgb=True, fmt="jpg"), dict()),
    (dict(sizes=[10, 14, 20]), dict(image_size=8, channels=3)),
])
def test_cached_pixels_are_the_decoded_ones(tmp_path, cache_dir, tree, options):
    write_tree(tmp_path / "t", **tree)
    plain, cached = folder(tmp_path / "t", image_cache="off", **options), folder(tmp_path / "t", **options)
    assert not plain.test.prepare() and plain.test.note == "--image-cache off"
    assert cached.test.prepare() and cached.train.prepare()
    idx = np.arange(len(cached.test))[::-1]
    np.testing.assert_array_equal(cached.test.take(idx), plain.test.take(idx))
    for i in (0, 3):
        np.testing.assert_array_equal(cached.train.load(i), plain.train.load(i))
        rng = lambda: np.random.default_rng([0, 1, i])  # noqa: E731  a training crop, from the cache when stored size
        np.testing.assert_array_equal(cached.train.load(i, rng()), plain.train.load(i, rng()))
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".json", ".u8", ".u8"]  # train, test; no tmp


def test_a_cache_is_found_again_and_an_edited_image_makes_a_new_one(tmp_path, cache_dir, monkeypatch):
    write_tree(tmp_path / "t")
    first = folder(tmp_path / "t")
    assert first.test.prepare()

    def boom(*a, **k):
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(decoded, "build", boom)
        again = folder(tmp_path / "t")
        assert again.test.prepare()
        np.testing.assert_array_equal(again.test.take([0, 1]), first.test.take([0, 1]))
    edited = again.test.files[1]
    write_tree(tmp_path / "other", seed=5)
    os.replace(tmp_path / "other" / "test" / "ant" / "1.png", edited)  # new content, new size or time
    fresh = folder(tmp_path / "t")
    assert fresh.test.prepare()
    assert not np.array_equal(fresh.test.take([1]), first.test.take([1]))
    assert len(list(cache_dir.glob("*.u8"))) == 2  # the test split before and after the edit: none replaced


def test_an_unreadable_image_stops_the_build_with_one_line_or_is_counted(tmp_path, cache_dir):
    write_tree(tmp_path / "t")
    bad = tmp_path / "t" / "test" / "bee" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    data = folder(tmp_path / "t", workers=2)  # decoded by worker processes
    with pytest.raises(ConfigError) as e:
        data.test.prepare()
    assert str(bad) in e.value.one_line() and "--skip-bad-images" in e.value.one_line()
    assert "\n" not in e.value.one_line()
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temporary file left
    skipping = folder(tmp_path / "t", workers=2, skip_bad_images=True)
    assert skipping.test.prepare() and skipping.bad_images() == [str(bad)]
    row = skipping.test.files.index(str(bad))
    assert skipping.test.load(row) is None and not skipping.test.take([row]).any()
    seen = sum(len(y) for _, y in evaluate.eval_batches(skipping.test, batch_size=5))
    assert seen == len(skipping.test) - 1


def test_cached_training_batches_are_those_of_the_same_arrays_in_memory(tmp_path, cache_dir):
    write_tree(tmp_path / "t")
    data = folder(tmp_path / "t", augment="flip")
    source = batches_for(data.train, 8, True, 0, workers=2)
    assert isinstance(source, CachedBatches)
    memory = MemoryBatches(Split(data.train.take(range(len(data.train))), data.train.y), 8, True)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(1))
    got = list(source.epoch(order, 0, 1, torch.Generator().manual_seed(2), "cpu"))
    want = list(memory.epoch(order, 0, 1, torch.Generator().manual_seed(2), "cpu"))
    assert len(got) == len(want) == source.steps
    for a, b in zip(got, want):
        for u, v in zip(a[:4], b[:4]):
            assert torch.equal(u, v)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 3))
    plain = folder(tmp_path / "t", augment="flip", image_cache="off")
    assert evaluate.accuracy(model, data.test) == evaluate.accuracy(model, plain.test)


def test_random_crops_and_big_splits_decode_as_before(tmp_path, cache_dir, monkeypatch):
    write_tree(tmp_path / "t", size=16)
    crops = folder(tmp_path / "t", image_size=12)  # crops from a resized image: the files are decoded
    assert isinstance(batches_for(crops.train, 8, True, 0, workers=0), LoaderBatches)
    monkeypatch.setattr(decoded, "AUTO_LIMIT_BYTES", 100)
    big = folder(tmp_path / "t", augment="flip")
    assert isinstance(batches_for(big.train, 8, True, 0, workers=0), LoaderBatches)
    assert "auto caches up to" in big.train.note and "--image-cache on" in big.train.note
    forced = folder(tmp_path / "t", augment="flip", image_cache="on")
    assert isinstance(batches_for(forced.train, 8, True, 0, workers=0), CachedBatches)


def test_bad_cache_mode_and_the_cache_folder(tmp_path, monkeypatch):
    write_tree(tmp_path / "t")
    with pytest.raises(ConfigError, match="--image-cache must be one of auto, on, off"):
        folder(tmp_path / "t", image_cache="always")
    monkeypatch.delenv("EDGEKD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert decoded.cache_dir() == tmp_path / "xdg" / "edgekd" / "images"
    assert DataOptions(image_cache="off").record() == DataOptions().record()  # how fast, not what: not recorded


def test_an_unreadable_image_met_by_a_worker_process_is_one_line_without_the_cache(tmp_path, cache_dir):
    write_tree(tmp_path / "t")
    for split in ("train", "test"):
        (tmp_path / "t" / split / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    data = folder(tmp_path / "t", normalize="none", image_cache="off", workers=2)
    source = batches_for(data.train, 64, True, 0, workers=2)
    assert isinstance(source, LoaderBatches)
    order = torch.arange(len(data.train))
    for read in (lambda: list(source.epoch(order, 0, 1, torch.Generator().manual_seed(0), "cpu")),
                 lambda: list(evaluate.eval_batches(data.test))):
        with pytest.raises(ConfigError) as e:
            read()
        assert e.value.message.startswith("cannot read image ") and "1.png" in e.value.message
        assert "Traceback" not in e.value.one_line() and "--skip-bad-images" in e.value.one_line()


def test_processes_asking_at_once_decode_once(tmp_path, cache_dir):
    """Two processes (as torchrun ranks) prepare the same split: one decodes (slowly: 3 s), the other
    waits for it and reads."""
    import subprocess
    import sys

    write_tree(tmp_path / "t", per_class={"train": 40, "test": 4})
    code = ("import sys; from edgekd.data import load_dataset, decoded; from edgekd.data.options import DataOptions; "
            "import time; calls = []; real = decoded.build; "
            "decoded.build = lambda *a, **k: calls.append(time.sleep(3)) or real(*a, **k); "
            f"d = load_dataset('imagefolder:{tmp_path / 't'}', options=DataOptions(normalize='none', workers=0)); "
            "d.train.prepare(); print(len(calls))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    built = [int(p.communicate()[0].strip()) for p in procs]
    assert sorted(built) == [0, 1] and all(p.returncode == 0 for p in procs)
    assert not list(cache_dir.glob(".*"))  # no lock or temporary file left
