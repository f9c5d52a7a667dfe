"""JSON that edgekd reads back from files anyone may have edited (manifests, metrics, recipes, sweep
roots, reports): bounded in size and in nesting, so that a crafted file is one ``ValueError`` (its
callers turn it into their one-line error) and never a ``RecursionError`` here or later, in code
that walks the value again (``staging.finite``, ``json.dumps``, the report writers).

edgekd's own files nest a few levels; ``MAX_DEPTH`` leaves room for any table a user adds.
"""

from __future__ import annotations

import json
import os
import stat

MAX_DEPTH = 64  # arrays and objects inside one another
MAX_BYTES = 64 << 20  # default size limit of a file read here


def loads(data: str | bytes, max_depth: int = MAX_DEPTH):
    """``json.loads(data)``, refusing (ValueError) a value nested more than ``max_depth`` levels."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(f"arrays or objects nested more than {max_depth} levels") from None
    if _depth_above(value, max_depth):
        raise ValueError(f"arrays or objects nested more than {max_depth} levels")
    return value


def _depth_above(value, limit: int) -> bool:
    """Whether ``value`` holds lists / dicts more than ``limit`` levels deep (iterative: no recursion)."""
    level = [value] if isinstance(value, (list, dict)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below = []
        for item in level:
            for child in (item.values() if isinstance(item, dict) else item):
                if isinstance(child, (list, dict)):
                    below.append(child)
        level = below
    return False


def read(path, limit: int = MAX_BYTES, max_depth: int = MAX_DEPTH):
    """The JSON value of the regular file ``path``. OSError when it cannot be read (or is not a
    regular file: a FIFO is never opened); ValueError when it is larger than ``limit`` bytes, not
    UTF-8 JSON, or nested too deeply."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path} is not a regular file")
    if st.st_size > limit:
        raise ValueError(f"{st.st_size / 1e6:.0f} MB, more than the {limit / 1e6:.0f} MB a JSON file of edgekd's "
                         "may take")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"more than the {limit / 1e6:.0f} MB a JSON file of edgekd's may take")
    try:
        return loads(data.decode("utf-8"), max_depth)
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
