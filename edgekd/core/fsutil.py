"""Atomic folders, the output-path rule, what edgekd recognises as its own, default locations.

Nothing edgekd writes is left half-written (core.staging: files and folders are written under a
fresh hidden staging name and renamed into place; stale staging of a killed writer is cleaned up
by later writes). What it creates gets the user's umask, as any other program's files do.

**The output-path rule** (``check_output``, used by every command and the Python API before any
work): a command writes only a new path, an empty folder, or a path edgekd wrote before
(recognised by its marker, see ``artifact_kind``). Anything else is refused with one line unless
``overwrite``; and even then never a path that is empty, a device node, FIFO or socket, a
symbolic link, the current directory or one of its parents, the home folder or one of its parents,
a folder at the top of the file system (/usr, /tmp) that is not empty, the input being read, a regular file
given where a folder is written, or a folder that holds other runs or bundles.

**Replacing a folder** (a run, trained model or bundle) removes only what edgekd wrote in it
(``own_entries``: the files a run writes, a bundle's manifest ``files``): a folder of edgekd's
that also holds something else (a user's notes, another run put inside it) is refused up front
naming that entry, unless ``overwrite``, which consents to the entries there at the time of the
check and no others. ``atomic_dir`` checks again when it commits: an entry that appeared since is
never deleted (the new folder is then kept under a visible name next to it, and the error says so).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import ContextManager, Iterable

from . import jsonfile
from .errors import EdgekdError
from .staging import (STAGED, _os_error, atomic_path, current_umask, finite, remove, set_aside,  # noqa: F401
                      staged, stale, staging, user_error, write_bytes, write_json, write_text)

RUNS_DIR = Path("runs")
BUNDLES_DIR = Path("bundles")

# Markers: what edgekd writes into its own folders so that it recognises them later.
RUN_FORMAT = "edgekd-run-1"  # metrics.json "format" of a run (distill, quantize)
TEACHER_FORMAT = "edgekd-teacher-1"  # metrics.json "format" of a trained model (train, the teacher cache)
SWEEP_FORMAT = "edgekd-sweep-1"  # sweep.json "format" of a sweep root
FOLDER_KINDS = ("run", "teacher", "bundle", "sweep")
KIND_TEXT = {"run": "run", "teacher": "trained model", "bundle": "bundle", "sweep": "sweep root",
             "partial": "training state", "report": "report"}
REPLACED_KINDS = ("run", "teacher", "bundle")  # folders a command replaces whole (atomic_dir)
# every file distill, quantize and train write into a run or trained-model folder
RUN_FILES = frozenset({"student.pt", "float.pt", "model.pt", "recipe.json", "metrics.json", "metrics.csv",
                       "curves.png", "log.txt"})
_consented: dict[str, frozenset] = {}  # folder (real path) -> the entries ``overwrite`` agreed to replace


def atomic_dir(path: str | os.PathLike) -> ContextManager[Path]:
    """Yield a staging folder; on success it replaces ``path``, whose previous folder is kept until
    the new one is in place and never deleted with anything edgekd did not write in it (see the
    module docstring)."""
    return staged(Path(path), True, _commit)


def _commit(tmp: Path, path: Path) -> None:
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    foreign = foreign_entry(path, set(os.listdir(tmp)) | _consented.pop(_real(path), frozenset()))
    if foreign is not None:
        kept = Path(tempfile.mkdtemp(prefix=f"{path.name[:150]}.new-", dir=path.parent))
        os.replace(tmp, kept)
        raise EdgekdError(f"{path} holds {foreign}, which edgekd did not write, so it was not replaced; "
                          f"the new output is in {kept}", f"move {foreign} away and {kept.name} into place")
    old = set_aside(path)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old, path)  # put the previous folder back before reporting
        raise
    remove(old)


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
        return jsonfile.loads(data) if data is not None else None
    except (ValueError, UnicodeDecodeError):  # not JSON, or nested too deeply: not edgekd's
        return None


def _is_row(r) -> bool:
    return isinstance(r, dict) and isinstance(r.get("bundle"), str) and isinstance(r.get("status"), str)


# a training-state folder holds its options, phase checkpoints, and their staging files (older ones: .NAME.xxxxxxxx.tmp)
_PARTIAL_ENTRY = re.compile(r"(\.)?(options\.json|phase-\d+\.pt)(?(1)\.(edgekd-[0-9a-f]{6}-\d+-\d+-)?[a-z0-9_]{8}\.tmp)")


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


def _holds_artifacts(path: Path, depth: int = 3) -> Path | None:
    """An edgekd folder among the sub-folders of ``path`` (``depth`` levels down, hidden ones too,
    symbolic links not followed; at most 2000 folders looked at), or None."""
    level, looked = [path], 0
    for _ in range(depth):
        below = []
        for folder in level:
            try:
                below += sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.is_symlink())
            except OSError:
                continue
        for child in below[:2000 - looked]:
            if artifact_kind(child) is not None:
                return child
        looked += len(below)
        if looked >= 2000:
            return None
        level = below
    return None


def own_entries(path: Path) -> frozenset:
    """The names in the edgekd folder ``path`` that edgekd wrote: the regular files among a run's or
    trained model's file names (RUN_FILES); a bundle's manifest and the files it lists that are
    there unchanged (a plain name, a regular file, the sha256 the manifest records: a manifest
    edited to list a user's file or folder never makes it edgekd's); nothing for another folder."""
    kind = artifact_kind(path)
    if kind in ("run", "teacher"):
        return frozenset(n for n in RUN_FILES if _regular(path / n))
    if kind == "bundle":
        files = (_json_file(path / "manifest.json", 16 << 20) or {}).get("files")
        listed = files.items() if isinstance(files, dict) else ()
        return frozenset(["manifest.json", *(n for n, digest in listed if _unchanged(path, n, digest))])
    return frozenset()


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _unchanged(folder: Path, name, digest) -> bool:
    """Whether ``name`` is a file of ``folder`` (not a path leading elsewhere) holding the sha256 ``digest``."""
    if not (isinstance(name, str) and isinstance(digest, str) and name not in ("", ".", "..")
            and os.path.basename(name) == name and _regular(folder / name)):
        return False
    try:
        return sha256_file(folder / name) == digest
    except OSError:
        return False


def foreign_entry(path: Path, also: Iterable[str] = ()) -> str | None:
    """The first entry of the folder ``path`` that edgekd did not write (not in ``own_entries``, not
    in ``also``, not the staging of a dead edgekd writer on this host: a name that only looks like
    staging, of another host or of a live process, is someone else's), or None."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return None
    own = own_entries(path) | frozenset(also)
    return next((n for n in names if n not in own and not stale(n)), None)


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
    _consented.pop(real, None)  # given again by an overwrite below, for what is there now
    if _inside(cwd, real):
        raise EdgekdError(f"{shown} is the current directory or one of its parents", f"choose a new {what} below it")
    for source in inputs:
        if source is not None and (_inside(real, _real(source)) or _inside(_real(source), real)):
            raise EdgekdError(f"{shown} is the input being read ({source})", f"choose another {what}")
    _check_not_inside_artifact(Path(real), shown, what)
    if st is None:
        return path
    if folder and not stat.S_ISDIR(st.st_mode):
        raise EdgekdError(f"{shown} is a file", "give a folder: a new one, or one edgekd wrote")
    if not folder and stat.S_ISDIR(st.st_mode):
        raise EdgekdError(f"{shown} is a directory", "give a file name")
    return _check_existing(path, kind, overwrite, shown, what)


def _home() -> str | None:
    try:
        return _real(Path.home())
    except (RuntimeError, KeyError, OSError):  # no $HOME and no password entry
        return None


def _check_not_a_root(real: str, shown: str) -> None:
    """A folder that holds something and is the home folder, one of its parents, or at the top of the
    file system (/usr, /tmp, /data) holds far more than an output: never replaced, not even with
    ``overwrite`` (an empty one, e.g. a container's /out, may be written)."""
    home = _home()
    if home is not None and _inside(home, real):
        raise EdgekdError(f"{shown} is the home folder or one of its parents", "choose a new folder below it")
    if len(Path(real).parts) <= 2:
        raise EdgekdError(f"{shown} is a folder at the top of the file system", "choose a new folder below it")


def _check_not_inside_artifact(real: Path, shown: str, what: str) -> None:
    """Nothing is written inside a run, trained model or bundle: rewriting that folder would delete it."""
    for parent in real.parents:
        found = artifact_kind(parent)
        if found in REPLACED_KINDS:
            raise EdgekdError(f"{shown} is inside the edgekd {KIND_TEXT[found]} {parent} (rewriting it would "
                              f"delete what is written inside)", f"choose a {what} outside it")


def _check_existing(path: Path, kind: str, overwrite: bool, shown: str, what: str) -> Path:
    """check_output's rule for an existing folder or file of the right type."""
    folder, found = kind in FOLDER_KINDS, artifact_kind(path)
    names = _names(path) if kind in FOLDER_KINDS else None
    if folder and not names:
        return path
    if folder:
        _check_not_a_root(_real(path), shown)
    if folder and not kind == found == "sweep":  # a sweep root holds its cells
        inner = _holds_artifacts(path)
        if inner is not None:
            raise EdgekdError(f"{shown} holds other runs or bundles ({inner})",
                              f"move {inner} out of it, or choose another {what}" if found else
                              f"give a new {what} inside it, e.g. {path / 'NAME'}")
    if found == kind and kind in REPLACED_KINDS and not overwrite:
        foreign = foreign_entry(path)
        if foreign is not None:
            raise EdgekdError(f"{shown} holds {foreign}, which edgekd did not write (replacing the "
                              f"{KIND_TEXT[kind]} would delete it)", f"move {foreign} away, choose another {what}, "
                              "or pass --overwrite to replace the folder and all it holds")
    if found == kind or overwrite:
        if folder and overwrite:
            _consented[_real(path)] = frozenset(names)
        return path
    if found:
        raise EdgekdError(f"{shown} is an edgekd {KIND_TEXT[found]}, not a {KIND_TEXT[kind]}",
                          f"choose another {what}, or pass --overwrite to replace it")
    raise EdgekdError(f"{shown} exists and was not written by edgekd",
                      f"choose another {what}, or pass --overwrite to replace it")


def _names(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise EdgekdError(f"cannot read the folder {path}: {e.strerror}", "choose another folder") from None


def check_partial(path: Path, overwrite: bool = False, resume: bool = False) -> None:
    """The training-state folder ``OUT.partial`` of a run or teacher may be reused or discarded only
    when it holds edgekd's checkpoints (or nothing); never when it is a link, and never, not even
    with ``overwrite``, when it holds anything else (edgekd deletes only what it wrote)."""
    path = Path(path)
    if os.path.islink(path):
        raise EdgekdError(f"{path} is a symbolic link", "edgekd keeps training state only in a folder it "
                          "creates; remove the link")
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and (_is_partial(path) or not _names(path)):
        return
    raise EdgekdError(f"{path} exists and was not written by edgekd (edgekd keeps a run's training checkpoints "
                      "there, and would delete them)", "move it away, or choose another --out")
