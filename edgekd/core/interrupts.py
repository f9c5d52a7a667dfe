"""Ctrl-C (SIGINT) and SIGTERM while a command runs: raised as KeyboardInterrupt, and remembered.

A KeyboardInterrupt that Python raises while it runs a finalizer (a ``__del__``, a weakref callback,
the garbage collector's clean-up) is printed as "Exception ignored" and dropped: the command would
carry on and write its outputs as if nothing had happened. So the command-line handlers record
every signal here, and a staging file or folder is never committed after one (``check``): the
command stops as interrupted and its staging output is removed, as for an interrupt raised at once.
Outside the command line (the Python API) nothing is installed and ``check`` never raises.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_received: list[str] = []  # names of the signals received while the current command runs


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
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _received.append(signal.Signals(signum).name)
        _raise(_received[-1])

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _received.clear()


def check() -> None:
    """Raise the interrupt again if one was received (and dropped somewhere) during this command."""
    if _received:
        _raise(_received[-1])
