"""Dataset specs -> fixed, seeded (train, val, test) splits.

Specs: ``digits`` (scikit-learn's bundled 8x8 digits, the built-in default),
``fashion-mnist[:DIR]`` (the four IDX files; default directory is where Debian's
``dataset-fashion-mnist`` puts them, or $EDGEKD_FASHION_MNIST_DIR), ``npz:FILE``
(arrays ``x`` (N,H,W) or (N,C,H,W) and ``y``), all held in memory, and ``imagefolder:DIR``
(data.imagefolder: decoded lazily). Nothing is downloaded.

Images are scaled to [0, 1] and then normalized per channel (``--normalize``, data.normalize:
by default with the training split's mean and std); the normalization is recorded so that
exported bundles and devices can reproduce it.

Labels are checked where each source is read (data.npz, data.idx: one line naming the file, the
label and the range) and once more for every split of every dataset (``check_labels``), so no label
outside 0..C-1 reaches training, evaluation or export.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, MissingFileError
from ..core.registry import unknown
from .idx import read_idx, read_pair  # noqa: F401  (read_idx: part of edgekd.data)
from .normalize import resolve_normalization
from .npz import read_npz
from .options import DataOptions
from .splits import split_indices

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DATASETS = ("digits", "fashion-mnist", "npz")  # held in memory; imagefolder:DIR is read lazily


@dataclass
class Split:
    """A split held in memory (the lazy kind, an image folder's, is data.imagefolder.FolderSplit:
    both offer len(), .y, .take(idx) and .subset(idx))."""

    x: np.ndarray  # float32 (N, C, H, W), normalized
    y: np.ndarray  # int64 (N,)

    lazy = False

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx) -> np.ndarray:
        return self.x[np.asarray(idx, dtype=np.int64)]

    def subset(self, idx) -> "Split":
        idx = np.asarray(idx, dtype=np.int64)
        return Split(self.x[idx], self.y[idx])


@dataclass
class Dataset:
    name: str
    train: Split  # or a lazy split (data.imagefolder.FolderSplit): len(), .y, .take(idx), .subset(idx)
    val: Split
    test: Split
    classes: list[str]
    mean: list[float]
    std: list[float]
    flip_augment: bool = False  # random horizontal flips make sense for this data
    meta: dict = field(default_factory=dict)  # lazy splits: input_shape, transform, files per split
    options: DataOptions = field(default_factory=DataOptions)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        if "input_shape" in self.meta:
            return tuple(self.meta["input_shape"])
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def transform(self) -> dict:
        """What a device does to an image before the model (recorded in the run and the bundle)."""
        return self.meta.get("transform") or {"normalize": {"mean": self.mean, "std": self.std}}

    def bad_images(self) -> list[str]:
        """Images skipped so far because they could not be read (``--skip-bad-images``)."""
        found = set()
        for split in (self.train, self.val, self.test):
            found |= set(getattr(split, "bad", ()))
        return sorted(found)

    def describe(self) -> dict:
        return {"name": self.name, "input_shape": list(self.input_shape), "classes": self.classes,
                "normalization": {"mean": self.mean, "std": self.std},
                "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)}}


SPECS = ["digits", "fashion-mnist", "fashion-mnist:DIR", "npz:FILE", "imagefolder:DIR"]


def load_dataset(spec: str = "digits", seed: int = 0, val_fraction: float = 0.1,
                 options: DataOptions | None = None) -> Dataset:
    """Resolve a dataset spec. The split depends only on ``seed``, never on the machine.
    ``options``: normalization for every spec; size, channels, augmentation, workers and bad files
    for image folders (data.options)."""
    options = options or DataOptions()
    options.check_bounds()
    kind, _, arg = spec.partition(":")
    if kind == "imagefolder":
        return _imagefolder(spec, arg, seed, val_fraction, options)
    if kind == "digits" and ":" in spec:
        raise ConfigError(f"dataset {spec!r}: digits takes no argument (scikit-learn bundles it)", "use --data digits")
    if kind not in DATASETS:
        raise unknown("dataset", spec, SPECS)
    flip_asked = options.check_in_memory(spec)
    if kind == "digits":
        images, labels, classes = _digits()
        train, test = _split(images, labels, test_fraction=0.2, seed=seed)
        flip = False
    elif kind == "fashion-mnist":
        train, test = _fashion_mnist(Path(arg or os.environ.get("EDGEKD_FASHION_MNIST_DIR", FASHION_MNIST_DIR)))
        classes, flip = FASHION_CLASSES, True
    else:
        images, labels = read_npz(Path(arg))
        classes = [str(c) for c in range(int(labels.max()) + 1)]
        train, test = _split(images, labels, test_fraction=0.2, seed=seed)
        flip = False
    train, val = _split(*train, test_fraction=val_fraction, seed=seed + 1)
    if kind == "npz" and not (len(val[1]) and len(test[1])):  # the user's arrays: every split must hold samples
        raise ConfigError(f"dataset {spec}: too few samples per class ({len(train[1])} train, {len(val[1])} "
                          f"validation, {len(test[1])} test)", "give every class at least 10 samples")
    mean, std = resolve_normalization(options.normalize, train[0].shape[1], lambda: _stats(train[0]))
    norm = lambda a: ((a - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None])
    return check_labels(Dataset(kind if kind != "npz" else spec, Split(norm(train[0]), train[1]),
                                Split(norm(val[0]), val[1]), Split(norm(test[0]), test[1]), classes, mean, std,
                                flip_augment=flip if flip_asked is None else flip_asked, options=options))


def check_labels(data: Dataset) -> Dataset:
    """``data``, every label of every split in 0..C-1 (C classes), else one line naming the split."""
    top = data.num_classes - 1
    for name, split in (("training", data.train), ("validation", data.val), ("test", data.test)):
        y = np.asarray(split.y)
        bad = y[(y < 0) | (y > top)]
        if bad.size:
            raise ConfigError(f"dataset {data.name}: the {name} split holds label {int(bad[0])}, outside the range "
                              f"0..{top} ({data.num_classes} classes)", "labels are class indices 0..C-1")
    return data


def _imagefolder(spec: str, arg: str, seed: int, val_fraction: float, options: DataOptions) -> Dataset:
    from .imagefolder import load_imagefolder

    if not arg:
        raise ConfigError("dataset 'imagefolder' needs a folder", "use --data imagefolder:DIR with DIR/train/<class>/")
    data = load_imagefolder(Path(arg), seed, options.folder_options(), options.normalize, val_fraction)
    data.name, data.options = spec, options
    return check_labels(data)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    return images, d.target.astype(np.int64), [str(c) for c in d.target_names]


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """A seeded, stratified split: every class keeps its share in both parts."""
    keep, held = split_indices(y, test_fraction, seed)
    return (x[keep], y[keep]), (x[held], y[held])


def _stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x.std(axis=(0, 2, 3), dtype=np.float64)
    return [round(float(m), 6) for m in mean], [round(float(max(s, 1e-6)), 6) for s in std]


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise MissingFileError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}",
        "install it with 'apt-get install dataset-fashion-mnist' or pass --data fashion-mnist:DIR",
    )


def _fashion_mnist(directory: Path):
    parts = []
    for prefix in ("train", "t10k"):
        files = [_find(directory, f"{prefix}-{part}-idx{n}-ubyte") for part, n in (("images", 3), ("labels", 1))]
        images, labels = read_pair(*files, classes=len(FASHION_CLASSES))
        if parts and images.shape[1:] != parts[0][0].shape[2:]:
            raise ConfigError(f"{files[0]} holds {'x'.join(map(str, images.shape[1:]))} images, the training "
                              f"files {'x'.join(map(str, parts[0][0].shape[2:]))}", "pass the matching test files")
        parts.append(((images.astype(np.float32) / 255.0)[:, None], labels))
    return parts[0], parts[1]
