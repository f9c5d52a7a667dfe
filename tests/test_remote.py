"""edgekd bench --host: a real OpenSSH server on 127.0.0.1, started and stopped here.

The server (Debian's openssh-server; .ci/run installs it) runs as the current user on a free port
of 127.0.0.1 with a throwaway host key; it accepts one test key and sets the session's HOME to a
temporary folder, so the "device" side (~/.cache/edgekd) is this machine in a sandbox. The client
side uses its own ssh config (ssh -F) and known_hosts. The device environment (a venv with numpy,
click and onnxruntime, installed with --no-index from a wheelhouse downloaded here) is prepared
once for the module and reused, as it is on a real device. Skipped only where sshd cannot start.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import edgekd
from edgekd import bench
from edgekd.bench import remote, report
from edgekd.bench.remote import plan as rplan
from edgekd.bench.remote import run as rrun
from edgekd.bench.remote import ssh as rssh
from edgekd.catalog import load_profile
from edgekd.core.errors import ConfigError
from edgekd.core.fsutil import sha256_file
from tests.test_bench import make_bundle, write_profile

ALIAS = "edgekd-loopback"
BASE_PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


# --- the server -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgekd-test", "-f", str(path)], check=True)
    return path


def _answers(port: int, proc: subprocess.Popen, seconds: float = 10.0) -> bool:
    """True once the server on ``port`` sends its SSH banner; False if it exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def _client_config(path: Path, port: int, key: Path, known_hosts: Path) -> Path:
    path.write_text(f"""\
Host {ALIAS}
  HostName 127.0.0.1
  Port {port}
Host *
  User {getpass.getuser()}
  IdentityFile {key}
  IdentitiesOnly yes
  UserKnownHostsFile {known_hosts}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  LogLevel ERROR
""")
    return path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"the OpenSSH client ({tool}) is not installed")
    if not os.path.exists(binary):
        pytest.skip("sshd is not installed (Debian: apt-get install openssh-server; .ci/run does it)")
    if not os.path.isdir("/run/sshd"):  # sshd's privilege separation folder, made by its init script
        if os.geteuid() != 0:
            pytest.skip("sshd needs /run/sshd, which is missing, and only root can make it")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    root = tmp_path_factory.mktemp("ssh")
    host_key, key, wrong_key = _keygen(root / "host_key"), _keygen(root / "key"), _keygen(root / "wrong_key")
    (root / "authorized_keys").write_text((root / "key.pub").read_text())
    home = root / "home"  # the "device" user's HOME
    home.mkdir()
    log = root / "sshd.log"
    proc = None
    for _ in range(3):  # another process may take the free port before sshd binds it
        port = _free_port()
        config = root / "sshd_config"
        config.write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {host_key}
PidFile {root / 'sshd.pid'}
AuthorizedKeysFile {root / 'authorized_keys'}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {getpass.getuser()}
SetEnv HOME={home}
""")
        with open(log, "wb") as out:
            proc = subprocess.Popen([binary, "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
        if _answers(port, proc):
            break
        proc.kill()
        proc.wait()
        proc = None
    if proc is None:
        pytest.skip(f"sshd could not start: {log.read_text(errors='replace').strip()[-300:]}")
    known = root / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {(root / 'host_key.pub').read_text()}")
    (root / "empty_known_hosts").write_text("")
    server = types.SimpleNamespace(
        port=port, home=home, root=root, log=log,
        config=_client_config(root / "ssh_config", port, key, known),
        wrong_key_config=_client_config(root / "ssh_config_wrong", port, wrong_key, known),
        unknown_host_config=_client_config(root / "ssh_config_unknown", port, key, root / "empty_known_hosts"),
        cache=home / ".cache" / "edgekd")
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """numpy, click, onnxruntime and their dependencies as files, from what pip here reaches."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
                           "--only-binary=:all:", "-d", str(folder), *remote.device_requirements(["device"])],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


@pytest.fixture(scope="module")
def setup(sshd, wheelhouse, tmp_path_factory):
    """One wheel for the module: others may edit the package while it runs (a changed package is
    a new wheel, shipped again, which is right but not what these tests count)."""
    root = tmp_path_factory.mktemp("remote")
    wheel = remote.build_wheel(root / "local-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rplan, "build_wheel", lambda cache=None: wheel)
        yield _setup(root, wheelhouse, sshd)


def _setup(root, wheelhouse, sshd):
    profile = load_profile(str(write_profile(root, "fast")))
    return types.SimpleNamespace(root=root, profile=profile, cache=root / "local-cache",
                                 options=remote.RemoteOptions(remote_python=BASE_PYTHON, ssh_config=sshd.config,
                                                              wheelhouse=wheelhouse))


def run(setup, bundles, hosts=(ALIAS,), **options):
    lines: list[str] = []
    opts = remote.RemoteOptions(**{**setup.options.__dict__, **options})
    rows = remote.bench_remote(list(hosts), bundles, setup.profile, opts, log=lines.append, cache=setup.cache)
    return rows, lines


@pytest.fixture(scope="module")
def first_run(setup):
    """The first run on the device: upload, venv preparation, bench (the slow part, done once)."""
    bundle = make_bundle(setup.root, "good", n=20, wrong=5, torch_accuracy=0.8)
    start = time.monotonic()
    rows, lines = run(setup, [bundle])
    return types.SimpleNamespace(bundle=bundle, rows=rows, lines=lines, seconds=time.monotonic() - start)


# --- the happy path -------------------------------------------------------------------------------------

def test_remote_rows_match_a_local_bench(first_run, setup, sshd):
    rows = first_run.rows
    assert [r["status"] for r in rows] == ["ok", "ok"], "\n".join(first_run.lines)
    local = json.loads(json.dumps(report.records(bench.bench_bundles(  # as `bench --json` writes them
        [first_run.bundle], setup.profile.bench, setup.profile.budgets, setup.profile.name))))
    assert set(rows[0]) == set(local[0]) | {"host", "remote_path", "stage"}
    for mine, theirs in zip(rows, local):
        for key in ("bundle", "path", "accuracy", "torch_accuracy", "deploy_delta", "eval_samples", "batch_size",
                    "format", "weight_bits", "act_bits", "size_mb", "profile", "settings", "budget"):
            assert mine[key] == theirs[key], key
        assert mine["accuracy"] == pytest.approx(0.75)
        assert mine["host"] == ALIAS and mine["stage"] is None
        assert mine["remote_path"].startswith(str(sshd.cache / "bundles")) and mine["remote_path"].endswith("/good")
        assert mine["latency_ms"]["p50"] > 0 and mine["timed_runs"] >= 5
        env = mine["environment"]
        assert env["python"] == ".".join(map(str, sys.version_info[:3]))
        assert {"cpu_model", "onnxruntime_version", "providers_used", "edgekd_version"} <= set(env)
        assert "clock_changes" not in env  # nothing was changed without --set-clocks
    assert any("preparing" in line for line in first_run.lines)
    print("\n".join(first_run.lines), f"\nfirst run: {first_run.seconds:.1f} s")
    assert (sshd.cache / edgekd.__version__ / "venv" / "edgekd-stamp.json").is_file()
    assert not list((sshd.cache / "incoming").iterdir())


def test_second_run_reuses_the_device_and_two_hosts_make_one_table(first_run, setup, sshd):
    other = make_bundle(setup.root, "other", n=10, wrong=0)
    spec = f"{getpass.getuser()}@127.0.0.1:{sshd.port}"
    start = time.monotonic()
    rows, lines = run(setup, [first_run.bundle, other], hosts=(ALIAS, spec))
    seconds = time.monotonic() - start
    assert [(r["host"], r["bundle"], r["status"]) for r in rows] == \
        [(h, b, "ok") for h in (ALIAS, spec) for b in ("good", "good", "other", "other")], "\n".join(lines)
    uploads = [line for line in lines if "uploading" in line]
    assert len(uploads) == 1 and "1 item(s)" in uploads[0]  # only the new bundle, once: the second host has it
    assert not any("preparing" in line or "pip install" in line for line in lines)
    assert seconds < first_run.seconds
    assert {r["accuracy"] for r in rows if r["bundle"] == "other"} == {1.0}
    table = report.render_table(rows, extra=remote.TABLE_COLUMNS, footer=remote.footer(rows))
    print(table)
    header = table.splitlines()[0].split()
    assert header[:3] == ["bundle", "host", "status"]
    assert f"{ALIAS}: governor" in table and f"{spec}: governor" in table
    assert "clocks as found" in table


def test_set_clocks_applies_reports_and_restores(first_run, setup, sshd, monkeypatch):
    """Over SSH, on a fake cpufreq tree (the real one is never touched by the tests)."""
    files = []
    for n in range(2):
        folder = sshd.home / f"fake-sys/devices/system/cpu/cpu{n}/cpufreq"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scaling_governor").write_text("ondemand\n")
        files.append(folder / "scaling_governor")
    monkeypatch.setattr(rrun, "SYSFS", str(sshd.home / "fake-sys"))
    rows, lines = run(setup, [first_run.bundle], set_clocks=True)
    assert [r["status"] for r in rows] == ["ok", "ok"], "\n".join(lines)
    changes = rows[0]["environment"]["clock_changes"]
    assert changes["requested"] == remote.DEFAULT_CLOCKS
    if os.geteuid() == 0:
        assert changes["applied"] == ["cpu governor performance (was ondemand)"], changes
        assert changes["restored"] == ["cpu governor"] and changes["failed"] == []
    else:  # sudo -n: applied where sudo needs no password, else reported
        assert changes["applied"] or changes["failed"]
    assert {f.read_text().strip() for f in files} == {"ondemand"}  # as found
    assert "clocks: cpu governor performance" in "\n".join(remote.footer(rows)) or os.geteuid() != 0


def test_cli_bench_host_renders_one_table_and_writes_the_same_columns(first_run, setup, sshd, wheelhouse, tmp_path):
    """`edgekd bench BUNDLE --host ...`: the local table with a host column, footer lines per
    host, --json/--csv/--markdown with the host, and bench's exit codes (--strict)."""
    from click.testing import CliRunner

    from edgekd.cli import main

    common = ["bench", str(first_run.bundle), "--profile", setup.profile.path, "--ssh-config", str(sshd.config),
              "--wheelhouse", str(wheelhouse), "--remote-python", BASE_PYTHON, "--strict"]
    out = {k: tmp_path / f"rows.{k}" for k in ("json", "csv", "md")}
    result = CliRunner().invoke(main, common + ["--host", ALIAS, "--json", str(out["json"]), "--csv",
                                                str(out["csv"]), "--markdown", str(out["md"])])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("bundle"))
    assert lines[table].split()[:3] == ["bundle", "host", "status"]
    assert all(ALIAS in line for line in lines[table + 2: table + 4])
    assert any(line.startswith(f"{ALIAS}: governor") for line in lines)
    rows = json.loads(out["json"].read_text())
    assert [r["host"] for r in rows] == [ALIAS, ALIAS] and {r["status"] for r in rows} == {"ok"}
    assert out["csv"].read_text().splitlines()[0].split(",").count("host") == 1
    assert "| host |" in out["md"].read_text() and f"{ALIAS}: governor" in out["md"].read_text()

    port = _free_port()  # a host that cannot be reached: error rows, exit 1 with --strict
    result = CliRunner().invoke(main, common + ["--host", ALIAS, "--host", f"127.0.0.1:{port}"])
    assert result.exit_code == 1, result.output
    assert f"127.0.0.1:{port}: unreachable: cannot connect" in result.output
    result = CliRunner().invoke(main, common + ["--host", "bad host"])
    assert result.exit_code == 2 and "error: bad host" in result.output


# --- failures: one error row per bundle naming the host and the stage --------------------------------------

def _one_error(rows, stage, host=ALIAS):
    assert [r["status"] for r in rows] == ["error"]
    row = rows[0]
    assert row["stage"] == stage and row["host"] == host, row["error"]
    assert row["error"].startswith(f"{host}: {stage}: ")
    assert row["bundle"] == "good" and row["format"] == "qdq"  # what the local manifest says
    print(row["error"])
    return row["error"]


def test_unreachable_port(first_run, setup):
    port = _free_port()
    rows, _ = run(setup, [first_run.bundle], hosts=(f"127.0.0.1:{port}",))
    assert "Connection refused" in _one_error(rows, "unreachable", f"127.0.0.1:{port}")


def test_wrong_key_is_auth_refused(first_run, setup, sshd):
    rows, _ = run(setup, [first_run.bundle], ssh_config=sshd.wrong_key_config)
    assert "Permission denied" in _one_error(rows, "auth")


def test_unknown_host_key(first_run, setup, sshd):
    rows, _ = run(setup, [first_run.bundle], ssh_config=sshd.unknown_host_config)
    assert "accept its key" in _one_error(rows, "host key")


def test_old_python_on_the_device(first_run, setup, tmp_path):
    fake = tmp_path / "python3.8"
    fake.write_text("#!/bin/sh\necho 'Python 3.8.10'\n")
    fake.chmod(0o755)
    rows, _ = run(setup, [first_run.bundle], remote_python=str(fake))
    error = _one_error(rows, "python")
    assert "Python 3.8.10" in error and ">= 3.10" in error and "--remote-python" in error
    rows, _ = run(setup, [first_run.bundle], remote_python="/nonexistent/python3")
    assert "no Python" in _one_error(rows, "python")


def test_no_space(first_run, setup, monkeypatch):
    monkeypatch.setattr(rrun, "SPACE_MARGIN", 10 ** 18)  # more than any disk: the free space is real
    rows, _ = run(setup, [first_run.bundle])
    assert "free in" in _one_error(rows, "space")


def test_runtime_missing_when_pip_install_fails(first_run, setup, sshd, tmp_path):
    empty = tmp_path / "wheelhouse"
    empty.mkdir()
    (empty / "unrelated-1.0-py3-none-any.whl").write_bytes(b"not a wheel")
    rows, _ = run(setup, [first_run.bundle], wheelhouse=empty, remote_dir="~/other-cache")
    error = _one_error(rows, "runtime")
    assert "pip install" in error and "wheelhouse" in error
    venv = sshd.home / "other-cache" / edgekd.__version__ / "venv"
    assert venv.is_dir() and not (venv / "edgekd-stamp.json").exists()  # the next run starts over


def test_interrupted_upload_leaves_nothing_and_the_next_run_starts_clean(first_run, setup, sshd, monkeypatch):
    fresh = make_bundle(setup.root, "fresh", n=4000)  # about 64 kB of eval data
    key = sha256_file(fresh / "manifest.json")[:16]
    real_upload = rplan.write_upload

    def half_then_ctrl_c(stream, items):
        import io

        buffer = io.BytesIO()
        real_upload(buffer, items)
        stream.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        stream.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(rplan, "write_upload", half_then_ctrl_c)
    with pytest.raises(remote.Interrupted) as info:
        run(setup, [fresh], hosts=(ALIAS, "second-host-never-started"))
    assert info.value.exit_code == 130 and "while uploading" in info.value.one_line()
    assert [(r["host"], r["stage"]) for r in info.value.rows] == \
        [(ALIAS, "interrupted"), ("second-host-never-started", "interrupted")]
    assert not (sshd.cache / "bundles" / key).exists()
    incoming = sshd.cache / "incoming"
    deadline = time.monotonic() + 15  # the agent there sees the stream end and removes its folder
    while list(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not list(incoming.iterdir())
    monkeypatch.undo()

    # What a run killed outright leaves (its lock is free), next to an upload still in progress.
    dead = incoming / "up-dead"
    (dead / "data" / "bundles" / key / "fresh").mkdir(parents=True)
    (dead / "data" / "bundles" / key / "fresh" / "model.onnx").write_bytes(b"half a mod")
    (dead / ".lock").write_text("")
    live = incoming / "up-live"
    live.mkdir()
    held = open(live / ".lock", "w")
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        rows, lines = run(setup, [fresh])
    finally:
        held.close()
    assert [r["status"] for r in rows] == ["ok", "ok"], "\n".join(lines)
    assert any("removed 1 unfinished upload" in line for line in lines)
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in (sshd.cache / "bundles" / key / "fresh").iterdir()) == \
        ["eval.npz", "manifest.json", "model.onnx"]
    shutil.rmtree(live)


def test_a_modified_bundle_is_an_error_row_and_the_others_run(first_run, setup, tmp_path):
    broken = make_bundle(tmp_path, "broken")
    with open(broken / "model.onnx", "ab") as f:
        f.write(b"\0")
    rows, lines = run(setup, [broken, first_run.bundle])
    assert [(r["bundle"], r["status"]) for r in rows] == [("broken", "error"), ("good", "ok"), ("good", "ok")]
    assert "modified after export" in rows[0]["error"] and rows[0]["host"] == ALIAS
    assert not any("uploading" in line for line in lines)  # nothing to send: the broken one stays here


def test_damaged_copy_on_the_device_is_sent_again(first_run, setup, sshd):
    key = sha256_file(first_run.bundle / "manifest.json")[:16]
    model = sshd.cache / "bundles" / key / "good" / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    rows, lines = run(setup, [first_run.bundle])
    assert [r["status"] for r in rows] == ["ok", "ok"], "\n".join(lines)
    assert any("uploading 1 item(s)" in line for line in lines)
    assert model.read_bytes() == (first_run.bundle / "model.onnx").read_bytes()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_connection_lost_during_bench_stops_the_benchmark_there(setup, monkeypatch):
    """No benchmark runs on unattended (and keeps a core busy for the next run) once ssh is gone."""
    slow = make_bundle(setup.root, "slow-bundle", n=10)
    connections = []
    init = rssh.Connection.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        connections.append(self)

    monkeypatch.setattr(rssh.Connection, "__init__", record)
    lines: list[str] = []

    def log(line):
        lines.append(line)
        if "benchmarking" in line and line.endswith("..."):  # bench started there: drop the link
            os.kill(connections[-1].proc.pid, signal.SIGKILL)

    options = remote.RemoteOptions(**{**setup.options.__dict__, "overrides": {"min_time_s": 120.0}})
    start = time.monotonic()
    rows = remote.bench_remote([ALIAS], [slow], setup.profile, options, log=log, cache=setup.cache)
    assert time.monotonic() - start < 60
    assert [(r["stage"], r["status"]) for r in rows] == [("interrupted", "error")], "\n".join(lines)
    deadline = time.monotonic() + 15
    while _processes_mentioning("slow-bundle") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning("slow-bundle")


def test_agent_stops_its_child_when_stdin_closes():
    code = ("import sys; ns = {'__name__': 'agent', '__package__': None}; "
            "exec(compile(sys.argv[1], 'agent', 'exec'), ns); c = ns['Child'](watch=True)\n"
            "try:\n    c.run(['sleep', '60'])\nexcept ns['Failure'] as f:\n    print('STOPPED', f.stage)")
    proc = subprocess.Popen([sys.executable, "-c", code, rssh.agent_source()], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.stdin.close()
    assert proc.wait(timeout=20) == 0
    assert "STOPPED interrupted" in proc.stdout.read()


# --- without a server ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("pi@raspberrypi.local", ("raspberrypi.local", "pi", None)),
    ("orin:2222", ("orin", None, 2222)),
    ("jetson", ("jetson", None, None)),
    ("me@[::1]:2200", ("::1", "me", 2200)),
    ("fe80::1", ("fe80::1", None, None)),
    ("ssh://pi@10.0.0.7:22", ("10.0.0.7", "pi", 22)),
])
def test_parse_host(text, expected):
    host = remote.parse_host(text)
    assert (host.host, host.user, host.port) == expected and host.label == text


@pytest.mark.parametrize("text", ["", "@pi", "pi:port", "pi:70000", "-oProxyCommand=sh", "[::1]x", "a b"])
def test_bad_hosts_are_one_line_errors(text):
    with pytest.raises(ConfigError):
        remote.parse_host(text)


def test_device_requirements_follow_the_package_metadata():
    reqs = remote.device_requirements(["device"])
    assert {r.split(";")[0].split("<")[0].split(">")[0] for r in reqs} >= {"numpy", "click", "onnxruntime"}
    assert not any("extra" in r for r in reqs) and not any(r.startswith("torch") for r in reqs)


def test_wheel_is_cached_by_content(tmp_path):
    first = remote.build_wheel(tmp_path)
    assert remote.build_wheel(tmp_path) == first
    import zipfile

    names = zipfile.ZipFile(first).namelist()
    assert "edgekd/bench/remote/agent.py" in names and "edgekd/__main__.py" in names
    assert any(n.startswith("edgekd/_data/profiles/") for n in names)
    assert not any("__pycache__" in n for n in names)


def test_agent_clock_settings_with_fake_sysfs_and_jetson_tools(tmp_path, monkeypatch):
    """--set-clocks' device side, on files shaped like a Jetson's: set, report, restore."""
    agent = rssh.agent_namespace()
    for n in range(4):
        folder = tmp_path / f"sys/devices/system/cpu/cpu{n}/cpufreq"
        folder.mkdir(parents=True)
        (folder / "scaling_governor").write_text("schedutil\n")
    (tmp_path / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.3\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for tool, body in {"nvpmodel": 'if [ "$1" = -q ]; then echo "NV Power Mode: 15W"; echo 1; fi',
                       "jetson_clocks": "true",
                       "sudo": 'echo "sudo: a password is required" >&2; exit 1'}.items():
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n{body}\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    agent["euid"] = lambda: 0
    child = agent["Child"](watch=False)
    spec = {"governor": "performance", "jetson_clocks": True, "nvpmodel": 0}
    report_, undo = agent["set_clocks"](spec, child, sysfs=str(tmp_path / "sys"),
                                        tegra=str(tmp_path / "nv_tegra_release"))
    governors = sorted(tmp_path.glob("sys/devices/system/cpu/cpu*/cpufreq/scaling_governor"))
    assert {g.read_text().strip() for g in governors} == {"performance"}
    assert report_["failed"] == [] and len(report_["applied"]) == 3, report_
    agent["restore_clocks"](report_, undo, child)
    assert {g.read_text().strip() for g in governors} == {"schedutil"}
    assert len(report_["restored"]) == 3, report_
    log = calls.read_text().splitlines()
    assert "nvpmodel -m 0" in log and log[-1] == "nvpmodel -m 1"  # back to the mode it found
    assert any(line.startswith("jetson_clocks --store") for line in log)
    assert any(line.startswith("jetson_clocks --restore") for line in log)

    agent["euid"] = lambda: 1000  # not root: through sudo -n, which wants a password here
    report_, undo = agent["set_clocks"]({"governor": "performance"}, child, sysfs=str(tmp_path / "sys"),
                                        tegra=str(tmp_path / "none"))
    assert undo == [] and "a password is required" in report_["failed"][0]
    assert {g.read_text().strip() for g in governors} == {"schedutil"}


def test_agent_finds_a_power_mode_by_name_in_nvpmodel_conf(tmp_path):
    agent = rssh.agent_namespace()
    conf = tmp_path / "nvpmodel.conf"
    conf.write_text("< POWER_MODEL ID=0 NAME=15W >\nCPU_ONLINE CORE_0 1\n< POWER_MODEL ID=1 NAME=25W >\n"
                    "< POWER_MODEL ID=2 NAME=MAXN_SUPER >\n< PM_CONFIG DEFAULT=2 >\n")
    assert agent["nvpmodel_id"]("maxn_super", str(conf)) == (2, None)
    assert agent["nvpmodel_id"](1, str(conf)) == (1, None)
    number, why = agent["nvpmodel_id"]("MAXN", str(conf))
    assert number is None and "15W (0), 25W (1), MAXN_SUPER (2)" in why


def test_profile_clocks_table(tmp_path):
    from edgekd.catalog import Clocks

    base = write_profile(tmp_path, "dev").read_text()
    path = tmp_path / "clocked.toml"
    path.write_text(base + '\n[clocks]\ngovernor = "keep"\njetson_clocks = false\nnvpmodel = "MAXN"\n')
    profile = load_profile(str(path))
    assert profile.clocks == Clocks(governor="keep", jetson_clocks=False, nvpmodel="MAXN")
    assert remote.clock_settings(profile) == {"governor": None, "jetson_clocks": False, "nvpmodel": "MAXN"}
    assert remote.clock_settings(None) == remote.DEFAULT_CLOCKS
    for bad, words in (('governor = "turbo"', "governor must be one of"), ("nvpmodel = -1", "nvpmodel must be"),
                       ("jetson_clocks = 1", "must be bool"), ("speed = 2", "unknown key 'speed'")):
        path.write_text(base + f"\n[clocks]\n{bad}\n")
        with pytest.raises(ConfigError, match=words):
            load_profile(str(path))
    for name in ("rpi4", "rpi5", "orin-nano", "agx-orin"):  # the shipped device profiles fill it
        clocks = load_profile(name).clocks
        jetson = name not in ("rpi4", "rpi5")
        assert clocks.governor == "performance" and clocks.jetson_clocks == jetson
        assert (clocks.nvpmodel is not None) == jetson
