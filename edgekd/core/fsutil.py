"""Atomic writes and default locations shared by the commands.

Nothing edgekd writes is left half-written: files go to a temporary sibling and are renamed
into place; a bundle directory is assembled under a temporary name and renamed at the end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import EdgekdError

RUNS_DIR = Path("runs")
BUNDLES_DIR = Path("bundles")


def _os_error(path: Path, e: OSError) -> EdgekdError:
    if e.errno == errno.ENOSPC:
        return EdgekdError(f"no space left on device while writing {path}", "free some disk space and run again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EdgekdError(f"permission denied writing {path}", "choose a writable location with --out")
    return EdgekdError(f"cannot write {path}: {e.strerror}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _os_error(path, e) from None
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise _os_error(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` (the old one is kept until then)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _os_error(path, e) from None
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:  # put the previous directory back before reporting
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise _os_error(path, e) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def latest(root: Path, marker: str) -> Path | None:
    """The most recently written directory under ``root`` that contains ``marker``."""
    if not root.is_dir():
        return None
    found = [p.parent for p in root.glob(f"*/{marker}")]
    return max(found, key=lambda d: (d / marker).stat().st_mtime, default=None)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (bundles record one per file; bench checks them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
