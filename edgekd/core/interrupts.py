"""Ctrl-C (SIGINT) and SIGTERM while a command runs: raised as KeyboardInterrupt, and remembered.

A KeyboardInterrupt that Python raises while it runs a finalizer (a ``__del__``, a weakref callback,
the garbage collector's clean-up) is printed as "Exception ignored" and dropped: the command would
carry on and write its outputs as if nothing had happened. So the command-line handlers record
every signal here, and a staging file or folder is never committed after one (``check``): the
command stops as interrupted and its staging output is removed, as for an interrupt raised at once.
Outside the command line (the Python API) nothing is installed and ``check`` never raises.

Every signal seen while a command runs is also kept for its exit status (``last``, ``exit_code``:
128 + the signal's number, 130 for SIGINT, 143 for SIGTERM), also one that another handler took
(``note``: training's StopSignals, which finishes the step and saves instead of raising), so that
the command line reports an interrupted command as such whatever exception the interrupt became
on its way up (an ImportError around an import it stopped, an error of a library that caught it).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_received: list[str] = []  # names of the signals raised as interrupts while the current command runs
_seen: list[str] = []  # every signal seen while it runs, whoever handled it
_settled: list[bool] = []  # non-empty: signals are only recorded (the command is reporting its end)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same clean-up runs (staging
    folders removed, locks released) instead of the process dying where it stands."""


def _raise(name: str):
    raise Terminated() if name == "SIGTERM" else KeyboardInterrupt()


@contextmanager
def as_interrupts() -> Iterator[None]:
    """While the block runs (main thread only), SIGINT raises KeyboardInterrupt and SIGTERM
    Terminated, and both are recorded for ``check``."""
    _received.clear()
    _seen.clear()
    _settled.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        _seen.append(name)
        if not _settled:
            _received.append(name)
            _raise(name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _received.clear()
        _seen.clear()
        _settled.clear()


def settle() -> None:
    """From now until the command ends, signals are recorded but raise nothing (its last line is
    being written: a second Ctrl-C must not turn it into a traceback)."""
    _settled.append(True)


def note(name: str) -> None:
    """Record signal ``name`` (e.g. "SIGTERM") that another handler took, for the exit status."""
    _seen.append(name)


def last(raised_only: bool = False) -> str | None:
    """The last signal seen while the current command runs (``raised_only``: raised as an interrupt)."""
    names = _received if raised_only else _seen
    return names[-1] if names else None


def exit_code(name: str) -> int:
    """The exit status of a command stopped by signal ``name``: 128 + its number (SIGINT 130, SIGTERM 143)."""
    try:
        return 128 + signal.Signals[name].value
    except KeyError:
        return 130


def check() -> None:
    """Raise the interrupt again if one was received (and dropped somewhere) during this command."""
    if _received:
        _raise(_received[-1])
