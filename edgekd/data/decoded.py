"""The decoded-image cache of image folders (``--image-cache``): a split's images decoded once, through
the geometry of its evaluation transform (resize, centre crop, channels) and before normalization,
into one uint8 array ``(N, C, H, W)`` on disk that later epochs, evaluations and runs read
memory-mapped instead of decoding every file again.

Where: ``$EDGEKD_CACHE_DIR/images`` (default ``$XDG_CACHE_HOME/edgekd/images``, else
``~/.cache/edgekd/images``); one ``KEY.u8`` (the pixels) and ``KEY.json`` (shape, which files could
not be read, the SHA-256 of the pixels) per split. KEY is a SHA-256 of the geometry and of every file's path, size and
modification time, so an edited, added or removed image makes a new cache and never a stale read.
Files are written under a temporary name and renamed; edgekd removes nothing there (delete the
folder to reclaim the space). A cache is read only after its pixels match their checksum: a damaged
one (zeroed, truncated, edited) is decoded again and replaced, and says so (``rebuilt``, in the
split's log line). Its lock ``.KEY.lock`` is opened by core.locks.open_lock: never truncated, never
through a symbolic link; a link planted at KEY.u8 or KEY.json is refused, not followed. ``auto`` caches a split whose decoded pixels take at most
AUTO_LIMIT_BYTES and a quarter of the machine's memory, and fit twice in the free space; ``on`` only
asks for the free space; ``off`` decodes every time. The pages read count in the process's resident
memory, as file-backed pages the kernel can drop and read again (not as memory the process holds).

The pixels are what decoding the file gives, so a cached sample is bit-identical to a decoded one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.errors import ConfigError, EdgekdError, WorkerFailure
from ..core.fsutil import _os_error, atomic_path, sha256_file, write_json

FORMAT = "edgekd-image-cache-3"  # 2: the pixels' SHA-256 in KEY.json; 16-bit images scaled, not clipped; 3: EXIF turned
CACHE_MODES = ("auto", "on", "off")
AUTO_LIMIT_BYTES = 4 << 30
BUILD_BATCH = 256


def cache_dir() -> Path:
    """Where decoded images are cached (see the module docstring)."""
    root = os.environ.get("EDGEKD_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekd"
    return Path(root) / "images"


def check_cache_dir(folder: Path) -> Path:
    """The nearest existing folder at or above ``folder`` (where the cache will be made), or one
    ConfigError naming the variable that chose it when something else is in the way (a file, /dev/null)."""
    probe = folder
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        var = next((v for v in ("EDGEKD_CACHE_DIR", "XDG_CACHE_HOME") if os.environ.get(v)), "HOME")
        raise ConfigError(f"the decoded-image cache folder {folder} cannot be made: {probe} is not a folder "
                          f"(from ${var})", f"set {var} to a folder, or pass --image-cache off")
    return probe


def cache_key(files: list[str], geometry: dict) -> str:
    """SHA-256 of the geometry and of each file's resolved path, size and modification time."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "geometry": geometry}, sort_keys=True).encode())
    for path in files:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{os.path.realpath(path)}\0{stamp}\n".encode())
    return h.hexdigest()[:32]


@dataclass
class DecodedImages:
    """A split's cached pixels: ``array`` is the uint8 (N, C, H, W) memory map (opened on first use, in
    each process), ``ok`` says which files could be read."""

    path: Path
    shape: tuple[int, int, int, int]
    ok: np.ndarray  # bool (N,), per row of the file
    rows: np.ndarray | None = None  # the file's row of each sample of a split taken from it (None: all, in order)
    rebuilt: str | None = None  # why the cache found was not used and this one was decoded again
    _array: np.ndarray | None = None

    def __post_init__(self):
        if self.rows is None:
            self.rows = np.arange(self.shape[0], dtype=np.int64)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)
        return self._array

    def __getstate__(self):  # DataLoader workers reopen the map instead of receiving a copy
        return {**self.__dict__, "_array": None}

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))


def why_not(mode: str, nbytes: int, folder: Path) -> str | None:
    """Why a split of ``nbytes`` decoded bytes is not cached, or None when it is."""
    if mode == "off":
        return "--image-cache off"
    limit = min(AUTO_LIMIT_BYTES, _memory_bytes() // 4)
    if mode == "auto" and nbytes > limit:
        return (f"the decoded images would take {nbytes / 2**30:.2f} GiB (auto caches up to "
                f"{limit / 2**30:.2f} GiB: 4 GiB and a quarter of the memory; --image-cache on caches anyway)")
    free = shutil.disk_usage(check_cache_dir(folder)).free
    if 2 * nbytes > free:
        return f"{folder} has {free / 2**30:.1f} GiB free, the decoded images need {nbytes / 2**30:.1f} GiB (twice that asked)"
    return None


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return AUTO_LIMIT_BYTES * 4


def open_cached(key: str, shape: tuple[int, int, int, int], folder: Path | None = None) -> DecodedImages | None:
    """The cache of ``key`` when it is complete, of this shape and matches its checksum, else None."""
    return inspect(key, shape, folder or cache_dir())[0]


def inspect(key: str, shape: tuple[int, int, int, int], folder: Path) -> tuple[DecodedImages | None, str | None]:
    """(the cache of ``key``, None) when it can be used; else (None, why not), why None when there is none."""
    data, meta = folder / f"{key}.u8", folder / f"{key}.json"
    for path in (data, meta):
        _refuse_links(path)
    if not (data.exists() or meta.exists()):
        return None, None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or info.get("format") != FORMAT or tuple(info.get("shape", ())) != shape:
            return None, f"{meta} is not the record of this cache"
        size = data.stat().st_size
        if size != int(np.prod(shape)):
            return None, f"{data} holds {size} bytes, not the {int(np.prod(shape))} its record gives"
        if sha256_file(data) != info.get("sha256"):
            return None, f"{data} does not match its checksum (damaged or changed since it was written)"
        ok = _ok_rows(info.get("bad_rows"), shape[0])
    except (OSError, ValueError, TypeError) as e:
        return None, f"it cannot be read ({type(e).__name__}: {e})"
    return DecodedImages(data, shape, ok), None


def _refuse_links(path: Path) -> None:
    """A cache file must be a regular file edgekd wrote: a symbolic link (or a folder, a FIFO) planted
    there is neither followed nor replaced."""
    try:
        mode = os.stat(path, follow_symlinks=False).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise EdgekdError(f"decoded-image cache file {path} is {what}, not a file edgekd wrote",
                          "remove it, or pass --image-cache off")


def _ok_rows(bad, n: int) -> np.ndarray:
    rows = np.asarray(bad, dtype=np.int64)
    if rows.ndim != 1 or (rows < 0).any() or (rows >= n).any():
        raise ValueError("bad_rows must list rows of the cache")
    ok = np.ones(n, dtype=bool)
    ok[rows] = False
    return ok


def open_or_build(key: str, shape: tuple[int, int, int, int], decode: Callable[[int], np.ndarray | None],
                  workers: int, folder: Path | None = None) -> DecodedImages:
    """The cache of ``key``, made first if needed (or again, when the one found is damaged); processes
    asking at once (torchrun ranks, parallel runs) wait for the first to make it instead of all decoding."""
    import fcntl

    from ..core.locks import open_lock, release_lock

    folder = folder or cache_dir()
    found, _ = inspect(key, shape, folder)
    if found is not None:
        return found
    check_cache_dir(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(folder, e) from None
    lock = folder / f".{key}.lock"
    fd = open_lock(lock, "decoded-image cache")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file is closed, or the process ends
        found, why = inspect(key, shape, folder)
        if found is not None:
            return found
        images = build(key, shape, decode, workers, folder)
        images.rebuilt = why
        return images
    finally:
        release_lock(lock, fd)
        os.close(fd)


def build(key: str, shape: tuple[int, int, int, int], decode: Callable[[int], np.ndarray | None], workers: int,
          folder: Path | None = None) -> DecodedImages:
    """Decode every row (``decode(i)``: uint8 (C, H, W), None for an unreadable file that is skipped, or
    the WorkerFailure to stop with)
    with ``workers`` DataLoader processes into a new cache of ``key``."""
    import torch

    folder = folder or cache_dir()
    data, bad = folder / f"{key}.u8", []
    loader = torch.utils.data.DataLoader(_Rows(decode, shape[0]), batch_size=BUILD_BATCH, num_workers=workers,
                                         collate_fn=list)
    with atomic_path(data) as tmp:
        out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
        for items in loader:
            for i, pixels in items:
                if isinstance(pixels, WorkerFailure):
                    pixels.raise_()
                if pixels is None:
                    bad.append(i)
                else:
                    out[i] = pixels
        out.flush()
        del out
        checksum = sha256_file(tmp)
    write_json(folder / f"{key}.json", {"format": FORMAT, "shape": list(shape), "bad_rows": bad, "sha256": checksum})
    return DecodedImages(data, shape, _ok_rows(bad, shape[0]))


class _Rows:
    """Row i -> (i, decode(i)), for a DataLoader (a plain class so that worker processes can pickle it)."""

    def __init__(self, decode, n: int):
        self.decode, self.n = decode, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return i, self.decode(i)


def normalized(pixels: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 (..., C, H, W) -> float32 scaled to [0, 1] and normalized: the same operations, in the
    same order, as decoding a file (data.imagefolder.Transform), so the values are bit-identical."""
    a = pixels.astype(np.float32) / 255.0
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    return np.ascontiguousarray((a - m) / s)


def check_mode(mode: str) -> str:
    if mode not in CACHE_MODES:
        raise ConfigError(f"--image-cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
    return mode
