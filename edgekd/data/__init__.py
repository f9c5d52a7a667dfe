"""Datasets: specs -> fixed, seeded (train, val, test) splits with their normalization recorded."""

from .builtin import (DATASETS, FASHION_CLASSES, FASHION_MNIST_DIR, Dataset, Split,  # noqa: F401
                      load_dataset, read_idx)
