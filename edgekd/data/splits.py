"""The one rule every data set is split by: a seeded, stratified share of each class held out."""

from __future__ import annotations

import numpy as np


def split_indices(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) indices: a seeded, stratified share ``fraction`` of every class held out."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        held.append(idx[: int(round(len(idx) * fraction))])
    mask = np.zeros(len(y), bool)
    mask[np.concatenate(held)] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)
