"""``--data npz:FILE``: arrays ``x`` (N,H,W) or (N,C,H,W) and ``y`` (N,) in a NumPy .npz file,
checked where they enter: one error naming the file for each way it can be wrong.

- the path: missing, a directory, an empty file, not an npz archive (a text file, a CSV);
- the arrays: both present, no object arrays (they would be unpickled: never), numbers only;
- ``x``: finite values (no NaN or infinity), 3 or 4 dimensions, as many samples as ``y``;
- ``y``: 1-D integer labels (floats only when every value is a whole number), none negative,
  at least 2 classes, at least ``MIN_SAMPLES`` samples.

Pixel values above 1 are taken as 0..255 and scaled to [0, 1].
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, MissingFileError

MIN_SAMPLES = 10  # below this the seeded train/val/test split leaves a split empty


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (N,C,H,W), y int64 (N,)) of an npz file, every check above passed."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"dataset {path} is a directory, not an npz file", "pass --data npz:FILE with arrays x and y")
    if not path.is_file():
        raise MissingFileError(f"dataset file not found: {path}", "pass --data npz:FILE with arrays x and y")
    if path.stat().st_size == 0:
        raise ConfigError(f"dataset file {path} is empty (0 bytes)", "pass an npz file saved with numpy.savez")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{path} is not an npz file (numpy.savez writes a zip archive)",
                          "save the arrays with numpy.savez(FILE, x=images, y=labels)")
    x, y = _arrays(path)
    return _check_x(x, path), _check_y(y, len(x), path)


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise ConfigError(f"{path} must hold arrays 'x' and 'y', found {sorted(f.files)}")
            return f["x"], f["y"]
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise ConfigError(f"{path} holds object arrays, which would have to be unpickled (never done)",
                              "save x and y as numeric arrays") from None
        raise ConfigError(f"{path} is not a readable npz file ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path} is not a readable npz file ({type(e).__name__}: {e})") from None


def _check_x(x: np.ndarray, path: Path) -> np.ndarray:
    if x.dtype.kind not in "fiub":
        raise ConfigError(f"{path}: x must hold real numbers, got {x.dtype}", "save the images as a numeric array")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ConfigError(f"{path}: x must be (N,H,W) or (N,C,H,W), got {x.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ConfigError(f"{path}: x holds {int((~np.isfinite(x)).sum())} values that are not finite (NaN or "
                          "infinity)", "every pixel must be a finite number")
    if x.size and x.max() > 1.0:
        x = x / 255.0
    return x


def _check_y(y: np.ndarray, n: int, path: Path) -> np.ndarray:
    if y.ndim != 1:
        raise ConfigError(f"{path}: y must be 1-D (one label per sample), got shape {y.shape}")
    if len(y) != n:
        raise ConfigError(f"{path}: x and y must have as many samples, got {n} and {len(y)}")
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)  # whole numbers stored as floats
    if y.dtype.kind not in "iu":
        raise ConfigError(f"{path}: y must hold integer class labels, got {y.dtype}"
                          + (" with fractional values" if y.dtype.kind == "f" else ""), "save y as integers 0..C-1")
    if len(y) < MIN_SAMPLES:
        raise ConfigError(f"{path}: too few samples ({len(y)}); at least {MIN_SAMPLES} are needed for the train, "
                          "validation and test splits")
    if (y < 0).any():
        raise ConfigError(f"{path}: y holds negative labels (e.g. {int(y[y < 0][0])})", "labels are 0..C-1")
    if len(np.unique(y)) < 2:
        raise ConfigError(f"{path}: y holds one class only; at least 2 classes are needed")
    return y.astype(np.int64)
