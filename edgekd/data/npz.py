"""``--data npz:FILE``: arrays ``x`` (N,H,W) or (N,C,H,W) and ``y`` (N,) in a NumPy .npz file,
checked where they enter: one error naming the file for each way it can be wrong.

- the path: missing, a directory, an empty file, not an npz archive (a text file, a CSV);
- the arrays: both present and NumPy arrays, no object arrays (they would be unpickled: never,
  refused from the header before reading), numbers only; the shape each header declares must fit the
  bytes the archive holds for it (and the memory), checked before anything is allocated;
- ``x``: finite values (no NaN or infinity), 3 or 4 dimensions, as many samples as ``y``;
- ``y``: 1-D integer labels (floats only when every value is a whole number), in 0..C-1 with C at
  most ``MAX_CLASSES`` (C = the largest label + 1), at least 2 classes, at least ``MIN_SAMPLES`` samples.

Pixel values above 1 are taken as 0..255 and scaled to [0, 1].
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, MissingFileError

MIN_SAMPLES = 10  # below this the seeded train/val/test split leaves a split empty
MAX_CLASSES = 100_000  # labels are class indices 0..C-1: a larger label is not one
ZIP_RATIO = 1100  # deflate expands a byte into at most ~1032: a member declaring more is corrupt


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
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            found = {n[:-4] if n.endswith(".npy") else n for n in names}
            if "x" not in found or "y" not in found:
                raise ConfigError(f"{path} must hold arrays 'x' and 'y', found {sorted(found)}")
            x, y = (z.getinfo(k if k in names else k + ".npy") for k in ("x", "y"))  # np.load's order
            return _member(z, x, path), _member(z, y, path)
    except ValueError as e:
        raise ConfigError(f"{path} is not a readable npz file ({e})") from None
    except (OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
        raise ConfigError(f"{path} is not a readable npz file ({type(e).__name__}: {e})") from None


def _member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    """One array of the archive, read only once its header is safe: no objects, a declared size that
    the archive holds and the memory takes."""
    from .decoded import _memory_bytes

    fmt = np.lib.format
    where = f"{path}: {info.filename}"
    with z.open(info) as fp:
        try:
            version = fmt.read_magic(fp)
            shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fp)
        except ValueError as e:
            raise ConfigError(f"{where} is not a NumPy array ({e})", "save the arrays with numpy.savez") from None
        start = fp.tell()
    if dtype.hasobject:
        raise ConfigError(f"{where} holds object arrays, which would have to be unpickled (never done)",
                          "save x and y as numeric arrays")
    declared, held = math.prod(shape) * dtype.itemsize, info.file_size - start
    if declared != held:
        raise ConfigError(f"{where} declares shape {tuple(shape)} of {dtype} ({declared} bytes) but holds {held} "
                          "bytes", "save the arrays again with numpy.savez")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > ZIP_RATIO * info.compress_size + (1 << 16):
        raise ConfigError(f"{where} declares {info.file_size} bytes from {info.compress_size} compressed "
                          "(more than compression can give: the archive is corrupt)", "save the arrays again")
    if math.prod(shape) * 4 > _memory_bytes():
        raise ConfigError(f"{where} has shape {tuple(shape)}: {math.prod(shape) * 4 / 2**30:.1f} GiB as float32, "
                          f"more than this machine's memory ({_memory_bytes() / 2**30:.1f} GiB)",
                          "use a smaller array, or an image folder (--data imagefolder:DIR, read lazily)")
    with z.open(info) as fp:
        return fmt.read_array(fp, allow_pickle=False)


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
    whole = y.dtype.kind == "f" and bool(np.isfinite(y).all()) and bool((y == np.round(y)).all())
    if y.dtype.kind not in "iu" and not whole:  # whole numbers stored as floats are labels too
        raise ConfigError(f"{path}: y must hold integer class labels, got {y.dtype}"
                          + (" with fractional values" if y.dtype.kind == "f" else ""), "save y as integers 0..C-1")
    if len(y) < MIN_SAMPLES:
        raise ConfigError(f"{path}: too few samples ({len(y)}); at least {MIN_SAMPLES} are needed for the train, "
                          "validation and test splits")
    low, high = y.min().item(), y.max().item()  # Python numbers: compared before any cast can wrap
    if low < 0:
        raise ConfigError(f"{path}: y holds negative labels (e.g. {_show(low)}), outside the range 0..C-1",
                          "labels are class indices 0..C-1")
    if high >= MAX_CLASSES:
        raise ConfigError(f"{path}: y holds label {_show(high)}, outside the range 0..{MAX_CLASSES - 1} (labels are class "
                          f"indices 0..C-1, at most {MAX_CLASSES} classes)",
                          "remap the labels to 0..C-1, e.g. with numpy.unique(y, return_inverse=True)")
    y = y.astype(np.int64)
    if len(np.unique(y)) < 2:
        raise ConfigError(f"{path}: y holds one class only; at least 2 classes are needed")
    return y


def _show(label) -> str:
    """A label as written: whole floats without their .0."""
    return str(int(label)) if isinstance(label, float) and label.is_integer() and abs(label) < 2**63 else str(label)
