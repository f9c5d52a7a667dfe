"""Atomic writes, the output-path rule, what edgekd recognises as its own, default locations.

Nothing edgekd writes is left half-written: files go to a temporary sibling and are renamed
into place; a run or bundle directory is assembled under a temporary name (``.NAME.xxxx.tmp``)
and renamed at the end. What it creates gets the user's umask, as any other program's files do.

**The output-path rule** (``check_output``, used by every command and the Python API before any
work): a command writes only a new path, an empty folder, or a path edgekd wrote before
(recognised by its marker, see ``artifact_kind``). Anything else is refused with one line unless
``overwrite``; and even then never a path that is empty, a device node, FIFO or socket, a
symbolic link, the current directory or one of its parents, the input being read, a regular file
given where a folder is written, or a folder that holds other runs or bundles.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from . import interrupts
from .errors import EdgekdError

RUNS_DIR = Path("runs")
BUNDLES_DIR = Path("bundles")

# Markers: what edgekd writes into its own folders so that it recognises them later.
RUN_FORMAT = "edgekd-run-1"  # metrics.json "format" of a run (distill, quantize)
TEACHER_FORMAT = "edgekd-teacher-1"  # metrics.json "format" of a trained model (train, the teacher cache)
SWEEP_FORMAT = "edgekd-sweep-1"  # sweep.json "format" of a sweep root
FOLDER_KINDS = ("run", "teacher", "bundle", "sweep")
KIND_TEXT = {"run": "run", "teacher": "trained model", "bundle": "bundle", "sweep": "sweep root",
             "partial": "training state", "report": "report"}


# --- permissions ------------------------------------------------------------------------------------

def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _user_mode(path: Path, folder: bool) -> None:
    """Give what mkstemp (0600) / mkdtemp (0700) created the mode any other new file would have."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def _os_error(path: Path, e: OSError) -> EdgekdError:
    if e.errno == errno.ENOSPC:
        return EdgekdError(f"no space left on device while writing {path}", "free some disk space and run again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EdgekdError(f"permission denied writing {path}", "choose a writable location")
    return EdgekdError(f"cannot write {path}: {e.strerror}")


# --- atomic writes ----------------------------------------------------------------------------------

def _staging(path: Path, folder: bool) -> Path:
    """A new hidden temporary file or folder next to ``path`` (``.NAME.xxxx.tmp``), with the
    permissions the user's umask gives, for an atomic write of ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        _user_mode(tmp, folder=folder)
    except OSError as e:
        raise _os_error(path, e) from None
    return tmp


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    tmp = _staging(path, folder=False)
    try:
        yield tmp
        interrupts.check()  # never commit after an interrupt that was dropped on its way up
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
    """Valid JSON, always: NaN and infinities become null (JSON has neither)."""
    write_text(path, json.dumps(finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n")


def finite(obj):
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, containers copied."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _json_default(o):
    if hasattr(o, "tolist"):
        return finite(o.tolist())
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` (the old one is kept until then)."""
    path = Path(path)
    tmp = _staging(path, folder=True)
    try:
        yield tmp
        interrupts.check()
        old = None
        if os.path.lexists(path):
            old = path.with_name(f".{path.name}.old")
            remove(old)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:  # put the previous directory back before reporting
                os.replace(old, path)
            raise
        if old is not None:
            remove(old)
    except OSError as e:
        raise _os_error(path, e) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove(path: Path) -> None:
    """Delete a folder tree, a file or a symbolic link (never what a link points to); no error if absent."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def latest(root: Path, marker: str) -> Path | None:
    """The most recently written folder under ``root`` that contains ``marker``; hidden folders
    (edgekd's own staging folders ``.NAME.xxxx.tmp`` among them) never count."""
    if not root.is_dir():
        return None
    found = [p.parent for p in root.glob(f"*/{marker}") if not p.parent.name.startswith(".")]
    return max(found, key=lambda d: (d / marker).stat().st_mtime, default=None)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (bundles record one per file; bench checks them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- what edgekd wrote ------------------------------------------------------------------------------

def _read(path: Path, limit: int) -> bytes | None:
    """The first ``limit`` bytes of a regular file (never opens a FIFO or a device), or None."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def _json_file(path: Path, limit: int = 64 << 20):
    data = _read(path, limit)
    try:
        return json.loads(data) if data is not None else None
    except (ValueError, UnicodeDecodeError):
        return None


def _is_row(r) -> bool:
    return isinstance(r, dict) and isinstance(r.get("bundle"), str) and isinstance(r.get("status"), str)


_PARTIAL_ENTRY = re.compile(r"options\.json|phase-\d+\.pt|\..+\.tmp")


def artifact_kind(path: Path) -> str | None:
    """What edgekd wrote at ``path``, recognised by its marker, or None:

    - ``run``: metrics.json with ``format`` edgekd-run-1 (older runs: student.pt next to a
      metrics.json holding ``student_accuracy``);
    - ``teacher``: metrics.json with ``format`` edgekd-teacher-1 (older: model.pt next to a
      metrics.json holding ``accuracy``);
    - ``bundle``: manifest.json, a JSON object with ``edgekd_version`` and ``files``;
    - ``sweep``: sweep.json with ``format`` edgekd-sweep-1 (older: a JSON object with ``recipe``);
    - ``partial``: a ``NAME.partial`` folder of training checkpoints (options.json, phase-NN.pt);
    - ``report``: a file of bench rows: JSON (a list of objects with ``bundle`` and ``status``),
      CSV (header starting ``bundle,path,status``), Markdown (first line starting ``| bundle |``),
      or a PNG plot whose metadata names edgekd.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode):
        return "report" if _is_report(path) else None
    if not stat.S_ISDIR(st.st_mode):
        return None
    metrics = _json_file(path / "metrics.json", 16 << 20)
    if isinstance(metrics, dict):
        if metrics.get("format") == RUN_FORMAT or ("student_accuracy" in metrics and (path / "student.pt").is_file()):
            return "run"
        if metrics.get("format") == TEACHER_FORMAT or ("accuracy" in metrics and (path / "model.pt").is_file()):
            return "teacher"
    manifest = _json_file(path / "manifest.json", 16 << 20)
    if isinstance(manifest, dict) and "edgekd_version" in manifest and "files" in manifest:
        return "bundle"
    sweep = _json_file(path / "sweep.json", 1 << 20)
    if isinstance(sweep, dict) and (sweep.get("format") == SWEEP_FORMAT or "recipe" in sweep):
        return "sweep"
    if path.name.endswith(".partial") and _is_partial(path):
        return "partial"
    return None


def _is_partial(path: Path) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return "options.json" in names and all(_PARTIAL_ENTRY.fullmatch(n) for n in names)


def _is_report(path: Path) -> bool:
    head = _read(path, 4096) or b""
    if head.startswith(b"\x89PNG"):
        return b"edgekd" in head
    if head.startswith(b"bundle,path,status") or head.startswith(b"| bundle |"):
        return True
    if head.lstrip().startswith(b"["):
        rows = _json_file(path)
        return isinstance(rows, list) and bool(rows) and all(_is_row(r) for r in rows)
    return False


def _holds_artifacts(path: Path, depth: int = 2) -> Path | None:
    """An edgekd folder among the visible sub-folders of ``path`` (``depth`` levels down), or None."""
    try:
        children = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_dir()
                          and not p.is_symlink())
    except OSError:
        return None
    for child in children:
        if artifact_kind(child) is not None:
            return child
    for child in children if depth > 1 else ():
        found = _holds_artifacts(child, depth - 1)
        if found is not None:
            return found
    return None


def _real(path) -> str:
    return os.path.realpath(os.fspath(path))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(path, kind: str, inputs: Iterable = (), overwrite: bool = False, label: str = "output") -> Path:
    """``path`` if a command may write its ``kind`` there (a folder: run, teacher, bundle, sweep;
    a file: report), else one EdgekdError saying why (see the module docstring). ``inputs``: what
    the command reads (files or folders); ``label``: how the user named the path (``--json``)."""
    if path is None or os.fspath(path) == "":
        raise EdgekdError(f"{label} must not be empty", "give a path")
    path, folder = Path(path), kind in FOLDER_KINDS
    shown, what = f"{label} {path}", "folder" if folder else "file"
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise EdgekdError(f"{shown} is not a regular file{' or directory' if folder else ''}",
                          "edgekd never replaces device nodes, FIFOs or sockets; choose another path")
    if os.path.islink(path):
        raise EdgekdError(f"{shown} is a symbolic link", "give the path it points to, or another path")
    real, cwd = _real(path), _real(os.getcwd())
    if _inside(cwd, real):
        raise EdgekdError(f"{shown} is the current directory or one of its parents", f"choose a new {what} below it")
    for source in inputs:
        if source is not None and (_inside(real, _real(source)) or _inside(_real(source), real)):
            raise EdgekdError(f"{shown} is the input being read ({source})", f"choose another {what}")
    if st is None:
        return path
    if folder and not stat.S_ISDIR(st.st_mode):
        raise EdgekdError(f"{shown} is a file", "give a folder: a new one, or one edgekd wrote")
    if not folder and stat.S_ISDIR(st.st_mode):
        raise EdgekdError(f"{shown} is a directory", "give a file name")
    found = artifact_kind(path)
    if found == kind or (folder and not found and not os.listdir(path)):
        return path
    if folder:
        inner = _holds_artifacts(path)
        if inner is not None:
            raise EdgekdError(f"{shown} holds other runs or bundles ({inner})",
                              f"give a new {what} inside it, e.g. {path / 'NAME'}")
    if overwrite:
        return path
    if found:
        raise EdgekdError(f"{shown} is an edgekd {KIND_TEXT[found]}, not a {KIND_TEXT[kind]}",
                          f"choose another {what}, or pass --overwrite to replace it")
    raise EdgekdError(f"{shown} exists and was not written by edgekd",
                      f"choose another {what}, or pass --overwrite to replace it")


def check_partial(path: Path, overwrite: bool = False, resume: bool = False) -> None:
    """The training-state folder ``OUT.partial`` of a run or teacher may be reused or discarded only
    when it holds edgekd's checkpoints (or nothing); never when it is a link."""
    path = Path(path)
    if os.path.islink(path):
        raise EdgekdError(f"{path} is a symbolic link", "edgekd keeps training state only in a folder it "
                          "creates; remove the link")
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and (_is_partial(path) or not os.listdir(path)):
        return
    if overwrite and not resume:
        return
    raise EdgekdError(f"{path} exists and was not written by edgekd (edgekd keeps training checkpoints there)",
                      "move it away, or pass --overwrite to discard it")
