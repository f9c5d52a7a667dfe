"""`edgekd bench --host` for real, against an OpenSSH server on this machine's loopback.

Starts sshd (Debian's openssh-server) as the current user on a free port of 127.0.0.1 with
throwaway host and user keys and a sandbox HOME, writes an ssh config naming it ``loopback``, and
runs ``edgekd bench BUNDLE... --host loopback --ssh-config FILE`` with the remaining arguments.
The "device" is this machine: the run shows the whole path (wheel, upload, venv, bench, rows
back), not a Raspberry Pi's or a Jetson's numbers.

    python benchmarks/bench_ssh_loopback.py bundles/<bundle> --profile host-cpu --markdown out.md
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("sshd did not start (Debian: apt-get install openssh-server)")


def start_sshd(root: Path) -> tuple[subprocess.Popen, Path]:
    """sshd on 127.0.0.1 and the client config naming it ``loopback``."""
    _keygen(root / "host_key")
    _keygen(root / "key")
    (root / "home").mkdir()
    port = _free_port()
    (root / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'key.pub'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nAllowUsers {getpass.getuser()}\nSetEnv HOME={root / 'home'}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    proc = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(root / "sshd_config")],
                            stderr=subprocess.DEVNULL)
    _wait(port, proc)
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {(root / 'host_key.pub').read_text()}")
    config = root / "ssh_config"
    config.write_text(f"Host loopback\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n"
                      f"  IdentityFile {root / 'key'}\n  IdentitiesOnly yes\n  UserKnownHostsFile {root / 'known_hosts'}\n"
                      "  StrictHostKeyChecking yes\n  LogLevel ERROR\n")
    return proc, config


def main(argv: list[str]) -> int:
    root = Path(tempfile.mkdtemp(prefix="edgekd-loopback-"))
    proc, config = start_sshd(root)
    try:
        command = [sys.executable, "-m", "edgekd", "bench", *argv, "--host", "loopback", "--ssh-config", str(config),
                   "--remote-python", os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)]
        return subprocess.run(command, check=False).returncode
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
