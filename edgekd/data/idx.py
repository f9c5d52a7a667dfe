"""IDX files (MNIST's and Fashion-MNIST's format), raw or gzipped, checked where they enter: one
error naming the file for each way one can be wrong, before anything large is allocated.

- the bytes: gzip is recognised by its magic bytes, not by the name (a raw file named ``*.gz``
  reads as well); a damaged or cut gzip stream, an unreadable file: one line;
- the header: magic (two zero bytes, type 0x08 = unsigned bytes), the number of dimensions the
  caller expects (images N x H x W, labels N), every dimension;
- the size: the values the header declares must be what the file holds: exactly, for a raw file
  (before reading it); for a gzipped one, at most what gzip can expand its size into and what the
  memory holds (before reading), then exactly (read at most one value more than declared);
- Fashion-MNIST's pairs: as many labels as images, every label in 0..9, both parts the same size.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError

GZIP_MAGIC = b"\x1f\x8b"
GZIP_RATIO = 1100  # deflate expands a byte into at most ~1032
CHUNK = 1 << 22
HINT = "pass the original IDX files (e.g. Fashion-MNIST's, from 'apt-get install dataset-fashion-mnist')"


def read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """The uint8 array of an IDX file (optionally gzipped) with ``ndim`` dimensions when given."""
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            size = os.fstat(raw.fileno()).st_size
            packed = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw, mode="rb") if packed else raw
            shape = _header(f, path, ndim)
            count = math.prod(shape)
            _check_declared(path, shape, count, size, packed)
            data = _read_at_most(f, count + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ConfigError(f"{path} cannot be read as an IDX file (damaged gzip stream: {type(e).__name__}: {e})",
                          HINT) from None
    except OSError as e:
        raise ConfigError(f"{path} cannot be read as an IDX file ({type(e).__name__}: {e.strerror or e})",
                          HINT) from None
    if len(data) < count:
        raise ConfigError(f"{path} is truncated ({len(data)} of {count} values for shape {tuple(shape)})", HINT)
    if len(data) > count:
        raise ConfigError(f"{path} is longer than its header declares (more than {count} values for shape "
                          f"{tuple(shape)})", HINT)
    return np.frombuffer(data, np.uint8).reshape(shape)


def _header(f, path: Path, ndim: int | None) -> tuple[int, ...]:
    head = f.read(4)
    if len(head) < 4:
        raise ConfigError(f"{path} is not an IDX file (only {len(head)} bytes)", HINT)
    zero, dtype, dims = struct.unpack(">HBB", head)
    if zero != 0:
        raise ConfigError(f"{path} is not an IDX file (magic {head.hex()}, expected 0000 then the type)", HINT)
    if dtype != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file (type 0x{dtype:02x}, expected 0x08)", HINT)
    if ndim is not None and dims != ndim:
        raise ConfigError(f"{path} holds a {dims}-dimensional array, expected {ndim} dimensions "
                          f"({'N images x H x W' if ndim == 3 else 'N labels'})", HINT)
    raw = f.read(4 * dims)
    if len(raw) < 4 * dims:
        raise ConfigError(f"{path} is truncated (its header declares {dims} dimensions)", HINT)
    return struct.unpack(">" + "I" * dims, raw)


def _check_declared(path: Path, shape, count: int, size: int, packed: bool) -> None:
    """The size the header declares against the file's (``size`` bytes), before reading."""
    from .decoded import _memory_bytes

    held = size - 4 - 4 * len(shape)  # the bytes after the header of a raw file
    if not packed and count != held:
        state = "truncated" if held < count else "longer than its header declares"
        raise ConfigError(f"{path} is {state}: its header declares shape {tuple(shape)} ({count} values), the file "
                          f"holds {max(held, 0)}", HINT)
    if packed and count > GZIP_RATIO * size:
        raise ConfigError(f"{path} declares shape {tuple(shape)} ({count} values), more than a gzip file of "
                          f"{size} bytes can hold", HINT)
    if count * 4 > _memory_bytes():  # read as float32 next
        raise ConfigError(f"{path} declares shape {tuple(shape)}: {count * 4 / 2**30:.1f} GiB as float32, more "
                          f"than this machine's memory", HINT)


def _read_at_most(f, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        block = f.read(min(CHUNK, n - got))
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def read_pair(images_path: Path, labels_path: Path, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W), labels int64 (N,)) of an images file and its labels file, each label
    in 0..classes-1."""
    images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
    if not len(images):
        raise ConfigError(f"{images_path} holds no images", HINT)
    if len(images) != len(labels):
        raise ConfigError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels",
                          "pass an images file with its own labels file")
    bad = np.flatnonzero(labels >= classes)
    if bad.size:
        raise ConfigError(f"{labels_path}: label {int(labels[bad[0]])} (item {int(bad[0])}) is outside the range "
                          f"0..{classes - 1} ({classes} classes)", HINT)
    return images, labels.astype(np.int64)
