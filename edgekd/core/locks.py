"""The lock on a run being written: ``distill`` holds it from before training until the new run
directory is in place; ``export`` of that run meanwhile fails with one line instead of mixing the
old model with the new run's metrics. POSIX ``flock`` on a hidden ``.NAME.lock`` next to the run,
released by the kernel when the process ends, however it ends.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import EdgekdError
from .fsutil import _os_error


def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


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
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _os_error(file, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(file).st_ino:  # its holder deleted it meanwhile: still busy
                raise OSError
        except OSError:
            raise EdgekdError(f"{what} {path} is being written by another edgekd process",
                              "wait for it to finish, or choose another --out") from None
        try:
            yield
        finally:
            os.unlink(file)
    finally:
        os.close(fd)
        for folder in made:  # only those made here, and only while empty
            try:
                folder.rmdir()
            except OSError:
                break


def check_unlocked(path: Path, what: str = "run") -> None:
    """Fail with one line when another process holds ``path``'s write lock (writes nothing)."""
    import fcntl

    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise EdgekdError(f"{what} {path} is being written by another edgekd process",
                          "wait for it to finish, then run the command again") from None
    finally:
        os.close(fd)
