"""What an input path is, when it is not a regular file: a recipe or a checkpoint given as a folder, a
FIFO, a device, a socket, a link that loops or points nowhere is named as such in the error, not
"not found" (and never opened: reading a FIFO would block, /dev/zero would never end).
"""

from __future__ import annotations

import errno
import os
import stat

FILE, MISSING, DIRECTORY = "file", "missing", "directory"


def kind(path) -> str:
    """``file`` (a regular file, links followed), ``missing``, ``directory``, or what else it is
    (``a FIFO``, ``a device``, ``a socket``, ``a symbolic link that loops``, ...)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link that loops"
        if os.path.islink(path):
            return "a symbolic link to a missing path"
        return MISSING if e.errno in (errno.ENOENT, errno.ENOTDIR) else f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISDIR(mode):
        return DIRECTORY
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def special(path) -> str | None:
    """What ``path`` is when it exists as something other than a regular file or a folder (see
    ``kind``), else None (a file, a folder, or nothing: the caller words those)."""
    found = kind(path)
    return None if found in (FILE, MISSING, DIRECTORY) else found
