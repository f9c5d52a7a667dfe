"""Staging: how edgekd writes so that nothing is left half-written, and how it cleans up after a
writer that was killed.

A file or folder is written under a hidden staging name next to it and renamed into place when
complete. A folder that is replaced is first set aside, then removed once the new one is in place.
Both names are fresh, made for this write (never a fixed name that could already exist)::

    .NAME.edgekd-HOST-PID-START-xxxxxxxx.tmp   staging (a file, or a folder being assembled)
    .NAME.edgekd-HOST-PID-START-xxxxxxxx.old   the previous folder, set aside while it is replaced

HOST (a hash of the host name), PID and START (the process's start time, Linux clock ticks since
boot; 0 where unknown) name the writing process. A writer killed with SIGKILL, or by a power cut,
leaves its entries behind; ``clean_stale``, run by every later write into the same folder, removes
the staging entries whose writer is dead (same host, no process with that PID and start time) and
puts a set-aside folder back where its replacement never arrived. Nothing else is touched: not an
entry of another pattern, of a live process, of a PID above Linux's limit (no writer of edgekd's
had it), or of another host (a shared folder).

Disk full: ENOSPC/EDQUOT, and any failure inside a write while the disk is full (a library that
reports it as its own error: ONNX Runtime's "Protobuf serialization failed", torch's "file write
failed"), is one ``DiskFullError``; the half-written staging is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from . import interrupts
from .errors import DiskFullError, EdgekdError

NAME_LIMIT = 150  # longer output names are shortened in staging names (a file name has 255 bytes at most)
FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full
STAGED = re.compile(r"\.(?P<name>.+)\.edgekd-(?P<host>[0-9a-f]{6})-(?P<pid>[1-9]\d{0,9})-(?P<start>\d{1,20})"
                    r"-[a-z0-9_]{8}\.(?P<kind>tmp|old)")
PID_LIMIT = 1 << 22  # Linux's largest PID (PID_MAX_LIMIT): a name with a larger one is no edgekd writer's
_start_times: dict[int, int] = {}


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


# --- errors -----------------------------------------------------------------------------------------

def _os_error(path: Path, e: OSError) -> EdgekdError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full(path, quota=e.errno == errno.EDQUOT)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EdgekdError(f"permission denied writing {path}", "choose a writable location")
    return EdgekdError(f"cannot write {path}: {e.strerror}")


def disk_full(path, quota: bool = False) -> DiskFullError:
    why = "disk quota exceeded" if quota else "no space left on device"
    return DiskFullError(f"disk full: {why} while writing {path}; nothing of it was kept",
                         "free some disk space (or write to another disk) and run again")


def _disk_is_full(e: BaseException, where: Path) -> bool:
    """Whether ``e`` (or an exception it came from) is ENOSPC/EDQUOT, or ``where``'s disk is full now."""
    seen, cause = set(), e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        st = os.statvfs(where if os.path.exists(where) else Path(where).parent)
    except OSError:
        return False
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    return free < FULL_BYTES or (st.f_files > 0 and st.f_favail == 0)


def user_error(path: Path, e: BaseException, staging: Path) -> EdgekdError | None:
    """The one-line error for ``e``, raised while ``path`` was written through ``staging`` (still
    there), or None to let ``e`` through unchanged."""
    if isinstance(e, DiskFullError):
        return disk_full(path, quota="quota" in e.message)  # named after the output, not its staging
    if isinstance(e, OSError):
        return _os_error(path, e)
    if isinstance(e, Exception) and _disk_is_full(e, staging):
        return disk_full(path)
    return None


# --- who wrote a staging entry --------------------------------------------------------------------------

def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _owner() -> str:
    pid = os.getpid()
    if pid not in _start_times:
        _start_times[pid] = _start_time(pid) or 0
    return f"{_host()}-{pid}-{_start_times[pid]}"


def _alive(pid: int, start: int) -> bool:
    """Whether process ``pid`` that started at ``start`` may still run (True where unsure)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        pass
    now = _start_time(pid)
    return start == 0 or now is None or now == start  # another start time: the PID was reused


def stale(name: str) -> re.Match | None:
    """The match of ``name`` when it is a staging entry of a dead edgekd writer on this host."""
    m = STAGED.fullmatch(name)
    if m is None or m["host"] != _host() or int(m["pid"]) > PID_LIMIT or _alive(int(m["pid"]), int(m["start"])):
        return None
    return m


def clean_stale(folder: Path) -> None:
    """Remove the staging entries in ``folder`` whose writer is dead; put a set-aside folder back
    where nothing replaced it (see the module docstring). Never raises."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = stale(name)
        if not m:
            continue
        entry, target = Path(folder, name), Path(folder, m["name"])
        try:
            mode = os.lstat(entry).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                continue
            if m["kind"] == "tmp":
                remove(entry)
            elif len(m["name"]) < NAME_LIMIT and stat.S_ISDIR(mode):  # a name that was not shortened
                if os.path.lexists(target):
                    remove(entry)
                else:
                    os.rename(entry, target)
        except OSError:
            continue


def _prefix(path: Path) -> str:
    return f".{path.name[:NAME_LIMIT]}.edgekd-{_owner()}-"


# --- atomic writes ----------------------------------------------------------------------------------

def staging(path: Path, folder: bool) -> Path:
    """A new staging file or folder for ``path`` (see the module docstring), with the permissions
    the user's umask gives; stale staging of dead writers next to it is cleaned up first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent)
        if folder:
            tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        _user_mode(tmp, folder=folder)
    except OSError as e:
        raise _os_error(path, e) from None
    return tmp


def set_aside(path: Path) -> Path:
    """Move the folder ``path`` to a fresh ``.NAME.edgekd-....old`` next to it (an empty folder made
    for it, which the rename replaces); the new name."""
    old = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=path.parent))
    try:
        os.replace(path, old)
    except OSError:
        os.rmdir(old)
        raise
    return old


@contextmanager
def staged(path: Path, folder: bool, commit: Callable[[Path, Path], None]) -> Iterator[Path]:
    """Yield a new staging file or folder for ``path``; when the block succeeds, ``commit(staging,
    path)`` puts it in place. What the block raises becomes its one-line error for ``path``
    (``user_error``: disk full, permission denied), and so does an OSError of ``commit``; the
    staging is removed whatever happens (once committed, nothing is left of it)."""
    tmp = staging(path, folder=folder)
    try:
        try:
            yield tmp
            interrupts.check()  # never commit after an interrupt that was dropped on its way up
        except BaseException as e:
            error = user_error(path, e, tmp)
            if error is None:
                raise
            raise error from None
        try:
            commit(tmp, path)
        except OSError as e:
            raise _os_error(path, e) from None
    finally:
        if os.path.lexists(tmp):
            remove(tmp)


def atomic_path(path: str | os.PathLike) -> ContextManager[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    return staged(Path(path), False, os.replace)


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


def remove(path: Path) -> None:
    """Delete a folder tree, a file or a symbolic link (never what a link points to); no error if absent.
    Only for what edgekd made (its staging, its set-aside folders, its training state)."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
