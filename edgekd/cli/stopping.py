"""Ctrl-C and SIGTERM stop a command promptly even while its main thread is inside a runtime's C code.

Python runs a signal handler only between bytecodes of the main thread: while that thread is inside
one long native call (an ONNX Runtime session being created or run, a TensorRT engine being timed)
the ``KeyboardInterrupt`` of core.interrupts waits for the call to return, which may be minutes.
``stop_promptly`` has the interpreter's C-level handler also write the signal's number to a pipe
(``signal.set_wakeup_fd``); a watcher thread reads it at once and, if the command has not left the
block ``grace_s`` seconds later, prints the one line the command line prints for an interrupt and
ends the process with 130 (SIGINT) or 143 (SIGTERM). Only for blocks that write nothing: nothing
is left half-written when the process ends there.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

GRACE_S = 3.0  # seconds the normal interrupt gets to unwind before the process is ended
_STOPS = {int(signal.SIGINT): ("SIGINT", 130), int(signal.SIGTERM): ("SIGTERM", 143)}


def _watch(fd: int, done: threading.Event, grace_s: float) -> None:
    while not done.is_set():
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        stop = next((_STOPS[b] for b in data if b in _STOPS), None)
        if stop is not None and not done.wait(grace_s):
            os.write(2, f"error: interrupted by {stop[0]}\n".encode())
            os._exit(stop[1])


@contextmanager
def stop_promptly(grace_s: float | None = None) -> Iterator[None]:
    """While the block runs (main thread only), a SIGINT or SIGTERM not acted on within ``grace_s``
    seconds (default GRACE_S) ends the process with one line and 130 / 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):
        os.close(r)
        os.close(w)
        yield
        return
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(r, done, GRACE_S if grace_s is None else grace_s),
                               name="edgekd-stop-promptly", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old)
        done.set()
        os.write(w, b"\0")  # wake the watcher now
        watcher.join()
        os.close(r)
        os.close(w)
