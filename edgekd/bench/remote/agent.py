"""Device side, part 3 of 3: the commands ``probe``, ``receive`` and ``run``, and ``main``.

``probe`` claims the remote dir (agent_base.claim_root: made, or found empty, or edgekd's own by
its mark; never a link or a folder holding other files), removes upload folders of dead runs,
checks what the device already has (a damaged copy is deleted and sent again) and reports free
space. No step follows a symbolic link inside the remote dir (agent_base.under). ``receive`` unpacks one tar stream into a
temporary folder under ``incoming/``, checks it, and only then renames each item into place.
``run`` prepares the venv once (stamp written last), applies clocks with ``--set-clocks``, runs
``edgekd bench --json`` there and answers with its rows. See agent_base for how the parts run.
"""

import base64
import errno
import fcntl
import json
import os
import platform
import shutil
import signal
import sys
import tarfile
import tempfile

if __package__:  # imported as part of edgekd; on the device the parts share one namespace
    from .agent_base import (Child, Failure, Lock, check, claim_root, emit, free_bytes, item_ok, on_term, owned_root,
                             remove, say, under)
    from .agent_clocks import restore_clocks, set_clocks


def clean_incoming(root):
    """Remove upload folders (``up-*``, real folders, not links) whose lock no live process holds
    (their run died). Caller holds the global lock, under which receive creates a folder and its
    lock together."""
    incoming = under(root, "incoming")
    removed = []
    for name in sorted(os.listdir(incoming)) if os.path.isdir(incoming) else []:
        path = os.path.join(incoming, name)
        if not name.startswith("up-") or os.path.islink(path) or not os.path.isdir(path):
            continue  # not an upload folder edgekd made
        try:
            fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            fd = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # a live run is uploading into it
        remove(path)
        if fd is not None:
            os.close(fd)
        removed.append(name)
    return removed


def venv_dir(root, a):
    return under(root, a["version"] + ("/venv-system-site" if a["system_site"] else "/venv"))


def read_stamp(venv):
    try:
        with open(os.path.join(venv, "edgekd-stamp.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cmd_probe(a):
    root = claim_root(a)
    present = []
    with Lock(os.path.join(root, ".lock")):
        cleaned = clean_incoming(root)
        for item in a["items"]:
            path = under(root, item["path"])
            if item_ok(root, item):
                present.append(item["path"])
            else:
                remove(path)  # damaged or partial: sent again
    emit({"ok": True, "root": root, "free": free_bytes(root), "present": present, "cleaned": cleaned,
          "env_ready": read_stamp(venv_dir(root, a)) is not None, "machine": platform.machine(),
          "python": platform.python_version()})


def unpack(stream, dest):
    """Regular files only, each new (no link followed), with at most its mode here: read and write
    bits only (never wider than the file it came from, and umask applies)."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                target = under(dest, member.name)
                if not member.isfile():
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                source = tar.extractfile(member)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, member.mode & 0o666)
                with os.fdopen(fd, "wb") as f:
                    shutil.copyfileobj(source, f, 1 << 20)
    except (tarfile.TarError, EOFError) as e:
        raise Failure("interrupted", "the upload ended early (%s)" % e)


def cmd_receive(a):
    root = owned_root(a)
    incoming = under(root, "incoming")
    with Lock(os.path.join(root, ".lock")):
        os.makedirs(incoming, exist_ok=True)
        work = tempfile.mkdtemp(prefix="up-", dir=incoming)
        fd = os.open(os.path.join(work, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        data = os.path.join(work, "data")
        unpack(sys.stdin.buffer, data)
        for item in a["items"]:
            if not item_ok(data, item):
                raise Failure("upload", "%s arrived incomplete or damaged" % item["path"])
        with Lock(os.path.join(root, ".lock")):
            for item in a["items"]:
                target = under(root, item["path"])
                if item_ok(root, item):
                    continue  # another run put the same thing there meanwhile
                remove(target)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(os.path.join(data, item["path"]), target)
        emit({"ok": True})
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(fd)


def _fresh_venv(venv, want, a, child):
    if os.path.exists(venv):
        say("edgekd: removing %s (unfinished or made by another python)" % venv)
        remove(venv)
    say("edgekd: creating %s" % venv)
    argv = [sys.executable, "-m", "venv"] + (["--system-site-packages"] if a["system_site"] else []) + [venv]
    rc, tail = child.run(argv)
    check(rc, tail, "runtime", "python -m venv",
          "on Debian, Ubuntu and Raspberry Pi OS install the venv module: sudo apt install python3-venv")
    return dict(want, requirements=[], wheel=None)


def _install(root, a, python, stamp, stamp_path, child):
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    if a["wheelhouse"]:
        pip += ["--no-index", "--find-links", under(root, "wheelhouse")]
    missing = [r for r in a["requirements"] if r not in stamp["requirements"]]
    if missing or stamp["wheel"] != a["wheel_key"]:
        remove(stamp_path)
    if missing:
        say("edgekd: pip install " + " ".join(missing))
        rc, tail = child.run(pip + missing)
        check(rc, tail, "runtime", "pip install " + " ".join(r.split(";")[0] for r in missing))
        stamp["requirements"] = sorted(set(stamp["requirements"]) | set(missing))
    if stamp["wheel"] != a["wheel_key"]:
        rc, tail = child.run(pip + ["--no-deps", "--force-reinstall", under(root, a["wheel"])])
        check(rc, tail, "runtime", "pip install of the edgekd wheel")
        stamp["wheel"] = a["wheel_key"]


def prepare(root, a, child):
    """The venv, made once: stamp written last, removed before any change; no stamp = start over."""
    folder = under(root, a["version"])
    os.makedirs(folder, exist_ok=True)
    venv = venv_dir(root, a)
    python = os.path.join(venv, "bin", "python")
    want = {"python": os.path.realpath(sys.executable), "python_version": platform.python_version(),
            "system_site": a["system_site"]}
    stamp_path = os.path.join(venv, "edgekd-stamp.json")
    with Lock(os.path.join(folder, ".lock")):
        stamp = read_stamp(venv)
        if stamp is None or any(stamp.get(k) != v for k, v in want.items()) or not os.path.exists(python):
            stamp = _fresh_venv(venv, want, a, child)
        _install(root, a, python, stamp, stamp_path, child)
        if not os.path.exists(stamp_path):
            rc, tail = child.run([python, "-c", "import edgekd, numpy, click"])
            check(rc, tail, "runtime", "importing edgekd in the new environment")
            with open(stamp_path + ".tmp", "w") as f:
                json.dump(stamp, f)
            os.replace(stamp_path + ".tmp", stamp_path)
    return python


def cmd_run(a):
    root = owned_root(a)
    child = Child(watch=True)
    python = prepare(root, a, child)
    report, undo = set_clocks(a["clocks"], child, a.get("sysfs", "/sys")) if a.get("clocks") else (None, [])
    out = os.path.join(tempfile.mkdtemp(prefix="rows-", dir=root), "rows.json")  # bench makes the file
    try:
        argv = [python, "-m", "edgekd", "bench"] + [under(root, b) for b in a["bundles"]]
        if a.get("profile"):
            argv += ["--profile", under(root, a["profile"])]
        argv += ["--json", out] + a["bench_args"]
        rc, tail = child.run(argv, merge=False, cwd=root, quiet=out)  # not bench's "wrote <our temp file>"
        rows = None
        if rc == 0:
            try:
                with open(out) as f:
                    rows = json.load(f)
            except (OSError, ValueError):
                rows = None
        if rows is None:
            check(rc or 1, tail, "bench", "edgekd bench")
    finally:
        if undo:
            restore_clocks(report, undo, child)
        remove(os.path.dirname(out))
    emit({"ok": True, "rows": rows, "clocks": report})


def main():
    command, args = sys.argv[2], json.loads(base64.b64decode(sys.argv[3]))
    stage = {"probe": "upload", "receive": "upload", "run": "bench"}[command]
    signal.signal(signal.SIGTERM, on_term)
    try:
        {"probe": cmd_probe, "receive": cmd_receive, "run": cmd_run}[command](args)
    except Failure as f:
        emit({"ok": False, "stage": f.stage, "message": f.message, "hint": f.hint})
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            emit({"ok": False, "stage": "space", "message": "no space left on the device (%s)" % (e.filename or e),
                  "hint": "free some space there, or pass --remote-dir on a larger disk"})
        else:
            emit({"ok": False, "stage": stage, "message": "%s: %s" % (e.filename or command, e.strerror or e)})


if __name__ == "__main__":
    main()
