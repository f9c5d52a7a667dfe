"""Where bench and sweep write their reports: checked before anything runs, so that a bad path costs
no benchmark and no input is ever overwritten (core.fsutil.check_output holds the general rule)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..core.errors import EdgekdError
from ..core.fsutil import check_output


def _file_ids(path) -> set:
    """What names the file ``path``: its resolved path and, when it exists, its device and inode
    (a hard link or a differently spelt path to the same file)."""
    ids: set = {os.path.realpath(os.fspath(path))}
    try:
        st = os.stat(path)
        ids.add((st.st_dev, st.st_ino))
    except OSError:
        pass
    return ids


def _input_ids(inputs: Sequence) -> dict:
    """id -> input for every input file and every file directly inside an input folder."""
    found: dict = {}
    for source in (s for s in inputs if s is not None):
        files = [source] + (sorted(Path(source).iterdir()) if Path(source).is_dir() else [])
        for file in files:
            for key in _file_ids(file):
                found.setdefault(key, source)
    return found


def check_outputs(inputs: Sequence = (), overwrite: bool = False, **paths) -> None:
    """Before any bench: each report path given (option name -> path, e.g. ``json=rows.json``)
    obeys the output-path rule (core.fsutil.check_output; edgekd recognises its own reports), is
    none of the inputs (hard links included), and no two options name the same file."""
    seen: dict = {}
    read = None
    for option, path in paths.items():
        if path is None:
            continue
        check_output(path, "report", inputs, overwrite, label=f"--{option}")
        ids = _file_ids(path)
        twin = next((seen[i] for i in ids if i in seen), None)
        if twin is not None:
            raise EdgekdError(f"--{twin} and --{option} name the same file {path}", "give each output its own file")
        read = _input_ids(inputs) if read is None else read
        source = next((read[i] for i in ids if i in read), None)
        if source is not None:
            raise EdgekdError(f"--{option} {path} is the input being read ({source})", "choose another file")
        seen.update(dict.fromkeys(ids, option))
