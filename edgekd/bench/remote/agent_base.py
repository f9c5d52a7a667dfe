"""Device side, part 1 of 3: answers, failures, locks, files and the one child process at a time.

The device program is ``agent_base.py``, ``agent_clocks.py`` and ``agent.py`` joined in this
order and run by the device's own Python (>= 3.10) with ``python -c``: standard library only,
no ``from __future__`` (the parts are joined into one source) and no edgekd import. It answers
with one line ``EDGEKD-RESULT {json}`` on stdout; its progress and pip's and bench's output go
to stderr.
"""

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque

MARK = "EDGEKD-RESULT "


def emit(obj):
    try:
        sys.stdout.write(MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()
    except OSError:
        pass  # nobody is listening any more


def say(text):
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except OSError:
        pass


class Failure(Exception):
    def __init__(self, stage, message, hint=None):
        Exception.__init__(self, message)
        self.stage, self.message, self.hint = stage, message, hint


class Lock:
    """An exclusive flock on ``path`` (released when the process dies)."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def root_of(a):
    return os.path.abspath(os.path.expanduser(a["dir"]))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def free_bytes(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def item_ok(base, item):
    """Is ``item`` complete under ``base``: a bundle whose manifest and files match, or a file of
    the right size (and sha256)."""
    path = os.path.join(base, item["path"])
    try:
        if item["kind"] == "bundle":
            manifest = os.path.join(path, "manifest.json")
            if not sha256(manifest).startswith(item["key"]):
                return False
            with open(manifest) as f:
                files = json.load(f).get("files") or {}
            return all(sha256(os.path.join(path, name)) == digest for name, digest in files.items())
        return os.path.getsize(path) == item["size"] and (not item.get("sha256") or sha256(path) == item["sha256"])
    except (OSError, ValueError, AttributeError):
        return False


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def last_error(tail, rc):
    lines = [line for line in tail if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:") or "error:" in line.lower()]
    return (errors or lines or ["exit status %d" % rc])[-1].strip()


def check(rc, tail, stage, what, hint=None):
    if rc == 0:
        return
    text = " ".join(tail)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        raise Failure("space", "%s: no space left on the device" % what,
                      "free some space there, or pass --remote-dir on a larger disk")
    raise Failure(stage, "%s failed: %s" % (what, last_error(tail, rc)), hint)


class Child:
    """Runs one subprocess at a time and stops it when our stdin closes (the connection is gone)."""

    def __init__(self, watch):
        self.proc, self.hung = None, False
        if watch:
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        try:  # the raw descriptor: a daemon thread blocked in sys.stdin would stall interpreter shutdown
            while os.read(0, 1 << 16):
                pass
        except OSError:
            pass
        self.hung = True
        self._stop()

    def _stop(self):
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                threading.Timer(5, lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL)).start()
            except OSError:
                pass

    def run(self, argv, merge=True, cwd=None, input=None, quiet=None):
        """(exit status, last lines of output); output is passed on to our stderr line by line."""
        if self.hung:
            raise Failure("interrupted", "the connection closed")
        tail = deque(maxlen=40)
        try:
            proc = subprocess.Popen(argv, cwd=cwd, start_new_session=True, text=True, errors="replace",
                                    stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE if merge else subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT if merge else subprocess.PIPE)
        except OSError as e:
            return 127, ["%s: %s" % (argv[0], e.strerror)]
        self.proc = proc
        if self.hung:
            self._stop()
        if input is not None:
            try:
                proc.stdin.write(input)
                proc.stdin.close()
            except OSError:
                pass
        for line in (proc.stdout if merge else proc.stderr):
            line = line.rstrip()
            tail.append(line)
            if not (quiet and quiet in line):
                say(line)
        rc = proc.wait()
        self.proc = None
        if self.hung:
            raise Failure("interrupted", "the connection closed")
        return rc, list(tail)
