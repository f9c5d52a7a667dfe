"""edgekd bench --host, safety (issue #21): what it deletes, follows, uploads and leaves running there.

The ssh tests reuse tests/test_remote.py's loopback sshd (its own server on 127.0.0.1, HOME in a
temporary folder). They stop before the device's venv is prepared (a fake wheel; ``_HostRun.bench``
replaced where an upload has to finish), so they need no wheelhouse and take seconds.
"""

from __future__ import annotations

import fcntl
import io
import os
import stat
import time
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekd.bench import remote
from edgekd.bench.remote import plan as rplan
from edgekd.bench.remote import run as rrun
from edgekd.bench.remote import ssh as rssh
from edgekd.core.errors import ConfigError
from tests.test_bench import make_bundle
from tests.test_remote import ALIAS, BASE_PYTHON, sshd  # noqa: F401 (sshd: the module's server fixture)


def _cli(*args):
    from edgekd.cli import main

    return CliRunner().invoke(main, ["bench", *map(str, args)])


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _tree(folder: Path) -> dict:
    """Every path under ``folder`` (links not followed) with its file contents or link target."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        found[rel] = (os.readlink(path) if path.is_symlink() else
                      path.read_bytes() if path.is_file() else "dir")
    return found


# --- without a server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundles"), "good", n=8)


@pytest.mark.parametrize("value,words", [
    ("", "is empty"), ("   ", "is empty"), ("/", "is the root folder"), ("//", "is the root folder"),
    ("~", "is the login folder"), ("~/", "is the login folder"), ("~/.", "is the login folder"),
    (".", "is the login folder"), ("./", "is the login folder"), ("~root", "is the login folder of root"),
    ("/tmp", "is a top-level folder"), ("/home/", "is a top-level folder"), ("~/..", "contains '..'"),
    ("cache/../..", "contains '..'"), (" ~/x", "blanks"), ("~/x\n", "control character"),
    ("$HOME/edgekd", "not expanded"),
])
def test_dangerous_remote_dirs_are_one_line_errors(bundle, value, words):
    result = _cli(bundle, "--host", "device.invalid", "--remote-dir", value)
    _one_line_error(result, "--remote-dir", words, "pass a folder of edgekd's own")


@pytest.mark.parametrize("value", ["~/.cache/edgekd", "~/x", "/data/edgekd", "cache", "~pi/edgekd"])
def test_ordinary_remote_dirs_pass(value):
    assert rssh.check_remote_dir(value) == value


@pytest.mark.parametrize("text", [
    "root@127.0.0.1:²", "pi:²²", "pi:٢٢", "pi:２２", "[::1]:³", "pi:0", "pi:00", "pi:70000", "pi:65536",
    "pi:", "[::1]:", "pi:-1", "pi:+22", "pi: 22", "pi:1e3", "pi:" + "9" * 5000, "pi\x00x", "u\x00@pi", "-l@pi",
])
def test_bad_ports_and_hosts_are_one_line_errors(text, bundle):
    with pytest.raises(ConfigError) as info:
        remote.parse_host(text)
    assert "\n" not in info.value.one_line() and len(info.value.one_line()) < 300
    _one_line_error(_cli(bundle, "--host", text), "bad ")


@pytest.mark.parametrize("text,port", [("pi:22", 22), ("pi:0022", 22), ("[::1]:65535", 65535), ("pi:1", 1)])
def test_good_ports(text, port):
    assert remote.parse_host(text).port == port
    assert rssh.parse_port(str(port)) == port


def test_control_characters_in_other_host_options_are_one_line_errors(bundle):
    _one_line_error(_cli(bundle, "--host", "pi", "--remote-python", "python3\x00"), "--remote-python")
    _one_line_error(_cli(bundle, "--host", "pi", "--ssh-option", "User=a\x00b"), "--ssh-option")


def test_a_bundle_holding_a_symlink_is_refused_before_anything_is_sent(tmp_path, monkeypatch):
    secret = tmp_path / "secret.key"
    secret.write_text("private")
    secret.chmod(0o600)
    linked = make_bundle(tmp_path, "linked", n=8)
    (linked / "notes.txt").symlink_to(secret)
    monkeypatch.setattr(rplan, "build_wheel", lambda cache=None: pytest.fail("no wheel is built"))
    line = _one_line_error(_cli(linked, "--host", "device.invalid"), "holds a symbolic link",
                           str(linked / "notes.txt"), "regular files only")
    assert str(secret) in line
    subdir = make_bundle(tmp_path / "b", "dirlink", n=8)  # a link to a folder, too
    (subdir / "extra").symlink_to(tmp_path)
    _one_line_error(_cli(subdir, "--host", "device.invalid"), str(subdir / "extra"))


def test_upload_never_widens_a_mode_and_holds_no_link(tmp_path):
    """Through the tar stream and the device's unpack: 0600 stays 0600, nothing gains a bit."""
    folder = make_bundle(tmp_path, "modes", n=8)
    modes = {"eval.npz": 0o600, "model.onnx": 0o640, "manifest.json": 0o755}
    for name, mode in modes.items():
        (folder / name).chmod(mode)
    item = rplan._bundle_ref(folder).item
    stream = io.BytesIO()
    rplan.write_upload(stream, [item])
    stream.seek(0)
    agent = rssh.agent_namespace()
    dest = tmp_path / "dest"
    old = os.umask(0o022)
    try:
        agent["unpack"](stream, str(dest))
    finally:
        os.umask(old)
    for name, mode in modes.items():
        got = stat.S_IMODE((dest / item.path / name).stat().st_mode)
        assert got == mode & 0o644, (name, oct(got))  # read/write bits only, umask 022 applies
    stream.seek(0)
    import tarfile

    names = [m for m in tarfile.open(fileobj=stream, mode="r|")]
    assert all(m.isfile() and m.uname == "" for m in names)


# --- the device side, run here --------------------------------------------------------------------------

def _args(root: Path, **more) -> dict:
    return {"dir": str(root), "version": "0.0.0", "system_site": False, **more}


def test_agent_claims_only_new_empty_or_own_folders(tmp_path, monkeypatch):
    agent = rssh.agent_namespace()
    failure = agent["Failure"]
    fresh = tmp_path / "fresh" / "edgekd"
    assert agent["claim_root"](_args(fresh)) == str(fresh)
    assert (fresh / ".edgekd-dir").is_file() and stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert agent["claim_root"](_args(fresh)) == str(fresh)  # its own, again
    empty = tmp_path / "empty"
    empty.mkdir()
    assert agent["claim_root"](_args(empty)) == str(empty)
    shared = tmp_path / "shared"
    (shared / "incoming" / "up-mine").mkdir(parents=True)
    (shared / "incoming" / "notes.txt").write_text("mine")
    before = _tree(shared)
    with pytest.raises(failure, match="holds files edgekd did not write"):
        agent["claim_root"](_args(shared))
    with pytest.raises(failure, match="not edgekd's"):
        agent["owned_root"](_args(shared))
    assert _tree(shared) == before
    old = tmp_path / "old"  # a folder an edgekd before the mark wrote: taken over
    (old / "bundles").mkdir(parents=True)
    (old / "incoming").mkdir()
    (old / ".lock").write_text("")
    assert agent["claim_root"](_args(old)) == str(old) and (old / ".edgekd-dir").is_file()
    local = tmp_path / "local"  # ~/.cache/edgekd of edgekd used on the device itself: its own caches
    (local / "images").mkdir(parents=True)
    (local / "wheels").mkdir()
    assert agent["claim_root"](_args(local)) == str(local)
    mine = tmp_path / "mine"  # edgekd's names, but no lock of its own
    (mine / "wheelhouse").mkdir(parents=True)
    (mine / "wheels").mkdir()
    with pytest.raises(failure, match="holds files edgekd did not write"):
        agent["claim_root"](_args(mine))
    link = tmp_path / "link"
    link.symlink_to(fresh)
    with pytest.raises(failure, match="symbolic link"):
        agent["claim_root"](_args(link))
    monkeypatch.setenv("HOME", str(shared))
    with pytest.raises(failure, match="the home folder"):
        agent["claim_root"](_args(shared))


def test_agent_cleans_only_its_own_dead_upload_folders(tmp_path):
    agent = rssh.agent_namespace()
    root = Path(agent["claim_root"](_args(tmp_path / "root")))
    incoming = root / "incoming"
    (incoming / "up-dead" / "data").mkdir(parents=True)
    (incoming / "up-dead" / ".lock").write_text("")
    (incoming / "notes").mkdir()  # not a name edgekd gives
    (incoming / "notes" / "a.txt").write_text("keep")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (incoming / "up-link").symlink_to(elsewhere)  # a link: neither followed nor removed
    assert agent["clean_incoming"](str(root)) == ["up-dead"]
    assert sorted(p.name for p in incoming.iterdir()) == ["notes", "up-link"]
    assert (elsewhere / "data").is_dir() and (incoming / "notes" / "a.txt").read_text() == "keep"


def test_agent_never_follows_a_link_inside_its_folder(tmp_path):
    agent = rssh.agent_namespace()
    root = Path(agent["claim_root"](_args(tmp_path / "root")))
    precious = tmp_path / "precious"
    (precious / "up-old").mkdir(parents=True)
    (precious / "up-old" / "file").write_text("keep")
    (root / "incoming").symlink_to(precious)
    with pytest.raises(agent["Failure"], match="symbolic link"):
        agent["clean_incoming"](str(root))
    with pytest.raises(agent["Failure"], match="symbolic link"):
        agent["under"](str(root), "incoming/up-x/data")
    (root / "bundles").symlink_to(precious)
    with pytest.raises(agent["Failure"], match="symbolic link"):
        agent["under"](str(root), "bundles/up-old/file")
    assert (precious / "up-old" / "file").read_text() == "keep"


# --- over ssh -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def light(sshd, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """A plan with a stand-in wheel: enough for the steps before the venv."""
    root = tmp_path_factory.mktemp("safety")
    wheel = root / "wheels" / "edgekd-0.0.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"a stand-in: the tests stop before pip")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rplan, "build_wheel", lambda cache=None: wheel)
        yield types.SimpleNamespace(root=root, home=sshd.home, bundle=make_bundle(root, "good", n=8),
                                    options=remote.RemoteOptions(remote_python=BASE_PYTHON, ssh_config=sshd.config))


def _run(light, bundles=None, **options):
    lines: list[str] = []
    opts = remote.RemoteOptions(**{**light.options.__dict__, **options})
    rows = remote.bench_remote([ALIAS], bundles or [light.bundle], None, opts, log=lines.append)
    return rows, lines


def _error(rows, stage, *fragments):
    assert [r["status"] for r in rows] == ["error"] and rows[0]["stage"] == stage, rows[0].get("error")
    for fragment in fragments:
        assert fragment in rows[0]["error"], rows[0]["error"]
    assert "\n" not in rows[0]["error"]
    return rows[0]["error"]


@pytest.fixture
def upload_only(monkeypatch):
    """Stop after the upload (no venv, no bench): the rows are empty."""
    monkeypatch.setattr(rrun._HostRun, "bench", lambda self, probe: [])


def test_a_foreign_incoming_folder_is_never_emptied(light, upload_only):
    shared = light.home / "shared"
    (shared / "incoming" / "up-report").mkdir(parents=True)  # even a name like edgekd's own
    (shared / "incoming" / "up-report" / "draft.txt").write_text("mine")
    (shared / "incoming" / "photo.jpg").write_bytes(b"\xff\xd8")
    before = _tree(shared)
    rows, lines = _run(light, remote_dir="~/shared")
    _error(rows, "upload", "holds files edgekd did not write", "incoming", "~/shared/edgekd")
    assert _tree(shared) == before, "\n".join(lines)

    rows, lines = _run(light, remote_dir="~/shared/edgekd")  # the folder the hint names: its own
    assert rows == [], "\n".join(lines)
    assert (shared / "edgekd" / ".edgekd-dir").is_file() and any("uploading" in line for line in lines)
    assert {k: v for k, v in _tree(shared).items() if not k.startswith("edgekd")} == before


def test_links_to_or_inside_the_remote_dir_are_not_followed(light, upload_only):
    precious = light.home / "precious"
    (precious / "up-old").mkdir(parents=True)  # shaped like upload folders of a dead run
    (precious / "up-old" / ".lock").write_text("")
    (precious / "bundles").mkdir()
    (precious / "notes.txt").write_text("keep")
    before = _tree(precious)
    (light.home / "linked").symlink_to(precious)
    rows, _ = _run(light, remote_dir="~/linked")
    _error(rows, "upload", "is a symbolic link", "pass the real folder")

    rows, lines = _run(light, remote_dir="~/own")  # an edgekd folder whose parts are then links
    assert rows == [], "\n".join(lines)
    own = light.home / "own"
    for part in ("incoming", "bundles"):
        moved = own / f"{part}.real"
        (own / part).rename(moved)
        (own / part).symlink_to(precious)
        rows, _ = _run(light, remote_dir="~/own")
        _error(rows, "upload", f"{own / part} is a symbolic link")
        (own / part).unlink()
        moved.rename(own / part)
    assert _tree(precious) == before


def test_a_private_file_arrives_private(light, upload_only, tmp_path):
    private = make_bundle(tmp_path, "private", n=8)
    (private / "eval.npz").chmod(0o600)
    rows, lines = _run(light, [private], remote_dir="~/modes")
    assert rows == [], "\n".join(lines)
    [arrived] = (light.home / "modes" / "bundles").glob("*/private/eval.npz")
    assert stat.S_IMODE(arrived.stat().st_mode) == 0o600
    assert stat.S_IMODE((light.home / "modes").stat().st_mode) == 0o700


def _connections(monkeypatch) -> list:
    made = []
    init = rssh.Connection.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(rssh.Connection, "__init__", record)
    return made


def _gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    return not os.path.exists(f"/proc/{pid}")


def test_a_python_that_never_answers_is_stopped_there(light, tmp_path, monkeypatch):
    fake = light.home / "hung-python"
    fake.write_text("#!/bin/sh\nsleep 301.5\n")
    fake.chmod(0o755)
    made = _connections(monkeypatch)
    start = time.monotonic()
    rows, _ = _run(light, remote_python=str(fake), connect_timeout=2, step_timeout=1)
    assert time.monotonic() - start < 25
    _error(rows, "interrupted", "did not answer within 3 s while connecting", "was stopped")
    pid = made[-1].remote_pid
    assert pid is not None and _gone(pid)
    assert not [p for p in Path("/proc").glob("[0-9]*") if b"301.5" in _cmdline(p)]


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_probe_that_never_answers_is_stopped_there(light, upload_only, monkeypatch):
    rows, lines = _run(light, remote_dir="~/held")
    assert rows == [], "\n".join(lines)
    made = _connections(monkeypatch)
    with open(light.home / "held" / ".lock", "a") as held:  # another run holds the folder, forever
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        rows, _ = _run(light, remote_dir="~/held", connect_timeout=2, step_timeout=2)
        assert time.monotonic() - start < 25
        _error(rows, "interrupted", "did not answer within 4 s while checking what the device has", "was stopped")
        pid = made[-1].remote_pid
        assert pid is not None and _gone(pid)  # not waiting for the lock any more
