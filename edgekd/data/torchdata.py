"""Data from the Python API: torch Datasets (or DataLoaders) with their class names.

``TorchData(train, test, classes=[...])`` turns a user's datasets into an edgekd Dataset whose splits
are read lazily, item by item, as image folders are: ``dataset[i]`` must give ``(image, label)``
with the image a CHW tensor (or array) already transformed and normalized as the model expects.
Without ``val`` a seeded, stratified tenth of ``train`` is held out for validation (its items then
go through the training transforms). The run records the dataset as ``python-api`` and the
normalization given here (``mean``/``std``; default: none recorded, i.e. 0 and 1), so a bundle
knows what a device must do; exporting such a run needs the same ``data`` again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import ConfigError

PYTHON_API = "python-api"


def _dataset_of(obj):
    """The Dataset of a DataLoader, or the object itself."""
    return getattr(obj, "dataset", obj) if obj.__class__.__name__.endswith("DataLoader") else obj


def labels_of(dataset) -> np.ndarray:
    """Every label of ``dataset``: its ``targets`` (torchvision's datasets), through a Subset's
    indices, else one pass over the items."""
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return np.asarray([int(t) for t in targets], dtype=np.int64)
    parent, indices = getattr(dataset, "dataset", None), getattr(dataset, "indices", None)
    if parent is not None and indices is not None:
        return labels_of(parent)[np.asarray(indices, dtype=np.int64)]
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


class TorchSplit:
    """One split backed by a torch Dataset (len(), .y, .take(idx), .subset(idx), .load(i))."""

    lazy = True
    crops = False  # set when the training items are randomly transformed (no teacher cache)

    def __init__(self, dataset, y: np.ndarray, indices: np.ndarray | None = None, workers: int = 0,
                 crops: bool = False):
        self.dataset, self.y = dataset, y
        self.indices = np.arange(len(y)) if indices is None else indices
        self.workers, self.crops, self.bad = workers, crops, set()

    def __len__(self) -> int:
        return len(self.y)

    def load(self, i: int, rng=None) -> np.ndarray:
        """Item ``i``'s image as float32 CHW (the dataset's own transforms apply; ``rng`` is unused)."""
        image = self.dataset[int(self.indices[i])][0]
        image = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        return np.ascontiguousarray(image, dtype=np.float32)

    def take(self, idx) -> np.ndarray:
        return np.stack([self.load(int(i)) for i in idx])

    def subset(self, idx) -> "TorchSplit":
        idx = np.asarray(idx, dtype=np.int64)
        return TorchSplit(self.dataset, self.y[idx], self.indices[idx], self.workers, self.crops)


@dataclass
class TorchData:
    """A user's torch datasets for ``api.train`` / ``api.distill`` / ``api.export``."""

    train: Any  # torch Dataset or DataLoader of (image CHW, label)
    test: Any
    classes: list
    val: Any = None  # None: a seeded, stratified tenth of train
    mean: list | None = None  # the normalization the datasets apply (recorded for devices)
    std: list | None = None
    augmented: bool = False  # train's items are randomly transformed: the teacher's outputs are not cached
    workers: int = 0  # DataLoader worker processes reading the items

    def dataset(self, seed: int = 0, val_fraction: float = 0.1):
        """The edgekd Dataset of these torch datasets (splits read lazily)."""
        from .builtin import Dataset
        from .options import DataOptions
        from .splits import split_indices

        classes = [str(c) for c in self.classes]
        if len(classes) < 2:
            raise ConfigError(f"TorchData needs at least 2 class names, got {len(classes)}", "pass classes=[...]")
        train_ds, test_ds = _dataset_of(self.train), _dataset_of(self.test)
        train = TorchSplit(train_ds, self._labels(train_ds, "train", classes), workers=self.workers,
                           crops=self.augmented)
        test = TorchSplit(test_ds, self._labels(test_ds, "test", classes), workers=self.workers)
        if self.val is not None:
            val_ds = _dataset_of(self.val)
            val = TorchSplit(val_ds, self._labels(val_ds, "val", classes), workers=self.workers)
        else:
            keep, held = split_indices(train.y, val_fraction, seed + 1)
            train, val = train.subset(keep), train.subset(held)
        shape = self._shape(test)
        mean = list(self.mean) if self.mean is not None else [0.0] * shape[0]
        std = list(self.std) if self.std is not None else [1.0] * shape[0]
        meta = {"input_shape": list(shape), "transform": {"python_api": True, "normalize": {"mean": mean, "std": std}}}
        return Dataset(PYTHON_API, train, val, test, classes, mean, std, flip_augment=False, meta=meta,
                       options=DataOptions(normalize="/".join(",".join(map(str, v)) for v in (mean, std)),
                                           workers=self.workers))

    @staticmethod
    def _labels(dataset, which: str, classes: list) -> np.ndarray:
        if len(dataset) == 0:
            raise ConfigError(f"TorchData {which} dataset is empty")
        y = labels_of(dataset)
        bad = y[(y < 0) | (y >= len(classes))]
        if bad.size:
            raise ConfigError(f"TorchData {which} dataset has label {int(bad[0])}, outside the {len(classes)} classes",
                              "labels must be 0..len(classes)-1")
        return y

    @staticmethod
    def _shape(split: TorchSplit) -> tuple[int, int, int]:
        image = split.load(0)
        if image.ndim != 3:
            raise ConfigError(f"TorchData items must be (image, label) with a CHW image, got shape {list(image.shape)}",
                              "add a transform that gives C x H x W tensors (torchvision's ToTensor)")
        return tuple(int(d) for d in image.shape)
