"""Dataset specs -> fixed, seeded (train, val, test) splits held in memory.

Specs: ``digits`` (scikit-learn's bundled 8x8 digits, the built-in default),
``fashion-mnist[:DIR]`` (the four IDX files; default directory is where Debian's
``dataset-fashion-mnist`` puts them, or $EDGEKD_FASHION_MNIST_DIR), and ``npz:FILE``
(arrays ``x`` (N,H,W) or (N,C,H,W) and ``y``). Nothing is downloaded.

Images are scaled to [0, 1] and then normalized per channel with the training split's mean
and std; the normalization is recorded so that exported bundles and devices can reproduce it.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, MissingFileError
from ..core.registry import unknown
from .npz import read_npz

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DATASETS = ("digits", "fashion-mnist", "npz")


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
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: list[float]
    std: list[float]
    flip_augment: bool = False  # random horizontal flips make sense for this data
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        return {"name": self.name, "input_shape": list(self.input_shape), "classes": self.classes,
                "normalization": {"mean": self.mean, "std": self.std},
                "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)}}


def load_dataset(spec: str = "digits", seed: int = 0, val_fraction: float = 0.1) -> Dataset:
    """Resolve a dataset spec. The split depends only on ``seed``, never on the machine."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and ":" in spec:
        raise ConfigError(f"dataset {spec!r}: digits takes no argument (scikit-learn bundles it)", "use --data digits")
    if kind == "digits":
        images, labels, classes = _digits()
        train, test = _split(images, labels, test_fraction=0.2, seed=seed)
        flip = False
    elif kind == "fashion-mnist":
        train, test = _fashion_mnist(Path(arg or os.environ.get("EDGEKD_FASHION_MNIST_DIR", FASHION_MNIST_DIR)))
        classes, flip = FASHION_CLASSES, True
    elif kind == "npz":
        images, labels = read_npz(Path(arg))
        classes = [str(c) for c in range(int(labels.max()) + 1)]
        train, test = _split(images, labels, test_fraction=0.2, seed=seed)
        flip = False
    else:
        raise unknown("dataset", spec, ["digits", "fashion-mnist", "fashion-mnist:DIR", "npz:FILE"])
    train, val = _split(*train, test_fraction=val_fraction, seed=seed + 1)
    if kind == "npz" and not (len(val[1]) and len(test[1])):  # the user's arrays: every split must hold samples
        raise ConfigError(f"dataset {spec}: too few samples per class ({len(train[1])} train, {len(val[1])} "
                          f"validation, {len(test[1])} test)", "give every class at least 10 samples")
    mean, std = _stats(train[0])
    norm = lambda a: ((a - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None])
    return Dataset(kind if kind != "npz" else spec, Split(norm(train[0]), train[1]), Split(norm(val[0]), val[1]),
                   Split(norm(test[0]), test[1]), classes, mean, std, flip_augment=flip)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    return images, d.target.astype(np.int64), [str(c) for c in d.target_names]


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """A seeded, stratified split: every class keeps its share in both parts."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        held.append(idx[: int(round(len(idx) * test_fraction))])
    mask = np.zeros(len(y), bool)
    mask[np.concatenate(held)] = True
    return (x[~mask], y[~mask]), (x[mask], y[mask])


def _stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x.std(axis=(0, 2, 3), dtype=np.float64)
    return [round(float(m), 6) for m in mean], [round(float(max(s, 1e-6)), 6) for s in std]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian header, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file", "pass the original Fashion-MNIST files")
    shape = struct.unpack(">" + "I" * ndim, data[4: 4 + 4 * ndim])
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated ({arr.size} of {int(np.prod(shape))} values)")
    return arr.reshape(shape)


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
        images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        parts.append(((images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)))
    return parts[0], parts[1]
