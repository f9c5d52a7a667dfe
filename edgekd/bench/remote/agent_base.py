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
import stat
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
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


ROOT_MARK = ".edgekd-dir"  # written first in a folder edgekd made (or found empty): the folder is edgekd's
# what an edgekd folder held before ROOT_MARK existed (such a folder is adopted), and what edgekd
# used on this machine itself keeps in ~/.cache/edgekd (its wheel and decoded image caches)
OLD_LAYOUT = (".lock", "incoming", "bundles", "wheels", "profiles", "wheelhouse", "images")
LOCAL_LAYOUT = ("wheels", "images")
LINK_HINT = "edgekd does not follow links in its folder: remove the link, or pass the real folder with --remote-dir"


def root_of(a):
    return os.path.abspath(os.path.expanduser(a["dir"]))


def _is_file(path):
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _old_layout(root, names):
    """An edgekd folder from before ROOT_MARK (its lock and its own names only), or the local caches
    of an edgekd run on this machine (only LOCAL_LAYOUT: nothing there that edgekd would delete)."""
    if all(n in LOCAL_LAYOUT for n in names):
        return True
    known = all(n in OLD_LAYOUT or n.startswith("rows-") or n[:1].isdigit() for n in names)
    return known and _is_file(os.path.join(root, ".lock"))


def claim_root(a):
    """The remote dir, made (mode 0700) or adopted: refused when it is a link, the home folder, or a
    folder that holds files edgekd did not write (edgekd deletes what it wrote there)."""
    root = root_of(a)
    if os.path.islink(root):
        raise Failure("upload", "the remote dir %s is a symbolic link" % root, LINK_HINT)
    if root in ("/", os.path.abspath(os.path.expanduser("~"))):
        raise Failure("upload", "the remote dir %s is %s" % (root, "the root folder" if root == "/" else "the home folder"),
                      "pass a folder of edgekd's own with --remote-dir")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        if not os.path.isdir(root):
            raise Failure("upload", "the remote dir %s is not a folder" % root, "pass another --remote-dir")
    names = os.listdir(root)
    if ROOT_MARK in names:
        if not _is_file(os.path.join(root, ROOT_MARK)):
            raise Failure("upload", "%s is not a file edgekd wrote" % os.path.join(root, ROOT_MARK), LINK_HINT)
        return root
    if names and not _old_layout(root, names):
        raise Failure("upload", "the remote dir %s holds files edgekd did not write (%s)"
                      % (root, ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")),
                      "edgekd deletes what it wrote there: pass a new or empty folder with --remote-dir, "
                      "e.g. %s/edgekd" % a["dir"].rstrip("/"))
    try:
        os.close(os.open(os.path.join(root, ROOT_MARK), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        pass  # another run claimed it at the same time
    return root


def owned_root(a):
    """The remote dir that probe claimed (receive and run work only there)."""
    root = root_of(a)
    if os.path.islink(root) or not _is_file(os.path.join(root, ROOT_MARK)):
        raise Failure("upload", "the remote dir %s is not edgekd's (no %s in it)" % (root, ROOT_MARK),
                      "run again: the first step claims a new or empty folder")
    return root


def under(root, rel):
    """``root/rel``; a symbolic link on the way is refused (never followed, never deleted)."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise Failure("upload", "refusing an unsafe path: %r" % rel)
    path = root
    for part in parts:
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise Failure("upload", "%s is a symbolic link" % path, LINK_HINT)
    return path


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
        """(exit status, last lines of output); output is passed on to our stderr line by line.
        Anything raised meanwhile (SIGTERM: see on_term) stops the child first."""
        try:
            return self._run(argv, merge, cwd, input, quiet)
        except BaseException:
            self._stop()
            raise

    def _run(self, argv, merge, cwd, input, quiet):
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


def on_term(signum, frame):
    """SIGTERM (edgekd here stops a step that ran past its time): unwind, so that children stop,
    clocks are restored and temporary folders go."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Failure("interrupted", "stopped by edgekd: the step ran past its time")
