"""The lock on a run being written: ``distill`` holds it from before training until the new run
directory is in place; ``export`` of that run meanwhile fails with one line instead of mixing the
old model with the new run's metrics. POSIX ``flock`` on a hidden ``.NAME.lock`` next to the run,
released by the kernel when the process ends, however it ends.

Lock files are opened by ``open_lock`` (also the decoded-image cache's, data.decoded): created if
missing, never truncated, never through a symbolic link (``O_NOFOLLOW``), and only a regular file
with no other hard link is taken; anything else planted there is refused with one line. A lock
file is removed only while it is still the one this process opened.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import EdgekdError
from .fsutil import _os_error


def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def open_lock(file: Path, what: str = "run") -> int:
    """A descriptor on the lock file ``file`` (see the module docstring); the caller closes it."""
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise EdgekdError(f"the {what} lock {file} is a symbolic link, not a lock file edgekd made",
                              "remove the link (edgekd never writes through one) and run again") from None
        raise _os_error(file, e) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        why = "has other hard links" if stat.S_ISREG(st.st_mode) else "is not a regular file"
        raise EdgekdError(f"the {what} lock {file} {why}, not a lock file edgekd made", "remove it and run again")
    return fd


def release_lock(file: Path, fd: int) -> None:
    """Remove the lock file ``file`` if it is still the file ``fd`` holds (never a path put there since)."""
    try:
        if os.stat(file, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            os.unlink(file)
    except OSError:
        pass


@contextmanager
def write_lock(path: Path, what: str = "run") -> Iterator[None]:
    """Hold the lock on ``path`` (a hidden ``.NAME.lock`` next to it) while it is being written.
    Another writer, or an export reading it, fails with one line. The lock file and the folders
    made for it go when the block ends."""
    import fcntl  # POSIX only, like the rest of the lock

    path = Path(path)
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    file = lock_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(path.parent, e) from None
    try:
        fd = open_lock(file, what)
    except EdgekdError:
        _remove_empty(made)
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(file, follow_symlinks=False).st_ino:  # its holder deleted it: busy
                raise OSError
        except OSError:
            raise EdgekdError(f"{what} {path} is being written by another edgekd process",
                              "wait for it to finish, or choose another --out") from None
        try:
            yield
        finally:
            release_lock(file, fd)
    finally:
        os.close(fd)
        _remove_empty(made)


def _remove_empty(made: list[Path]) -> None:
    for folder in made:  # only those made here, and only while empty
        try:
            folder.rmdir()
        except OSError:
            break


def check_unlocked(path: Path, what: str = "run") -> None:
    """Fail with one line when another process holds ``path``'s write lock (writes nothing)."""
    import fcntl

    try:
        fd = os.open(lock_path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # not a lock edgekd made (a FIFO, a device): nobody holds it
            return
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise EdgekdError(f"{what} {path} is being written by another edgekd process",
                          "wait for it to finish, then run the command again") from None
    finally:
        os.close(fd)
