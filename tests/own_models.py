"""Models and image trees the tests of issue #12 build: a user's own architecture (named as
``tests.own_models:tiny_net``, a module:callable spec) and tiny image folders written as PNG or JPEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def tiny_net(num_classes: int = 3, in_channels: int = 1) -> nn.Module:
    """A user's architecture: conv stem, pooling, linear head (traces with torch.fx)."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))


def zero_net(num_classes: int = 3, in_channels: int = 1) -> nn.Module:
    """tiny_net with every weight zero: it predicts class 0 for every image (a teacher at chance)."""
    model = tiny_net(num_classes, in_channels)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def pattern(label: int, size: int = 12, rng=None) -> np.ndarray:
    """An 8-bit image of class ``label``: a bright horizontal band at a row that depends on the class
    (easy to learn), with noise."""
    rng = rng or np.random.default_rng(label)
    a = rng.integers(0, 60, (size, size)).astype(np.uint8)
    row = (2 + 3 * label) % size
    a[row: row + 2] = 230
    return a


def write_tree(root: Path, classes=("ant", "bee", "cat"), per_class: dict | None = None, size: int = 12,
               rgb: bool = False, fmt: str = "png", seed: int = 0, sizes=None) -> Path:
    """DIR/<split>/<class>/<i>.<fmt> for the splits in ``per_class`` (default 12 train, 4 test images
    per class). ``sizes``: a cycle of image sizes (mixed sizes) instead of one."""
    from PIL import Image

    per_class = per_class or {"train": 12, "test": 4}
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                s = sizes[i % len(sizes)] if sizes else size
                a = pattern(label, s, rng)
                im = Image.fromarray(np.stack([a, a // 2, 255 - a], -1) if rgb else a)
                im.save(folder / f"{i}.{fmt}", quality=95) if fmt == "jpg" else im.save(folder / f"{i}.{fmt}")
    return root


def train_plain(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 60, lr: float = 0.05) -> nn.Module:
    """Train ``model`` with plain PyTorch (as a user would, outside edgekd), full batch."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()
