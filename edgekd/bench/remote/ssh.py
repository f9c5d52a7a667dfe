"""The connection to a device: hosts, options, the OpenSSH client, and what its failures mean.

Every call goes through the system ``ssh`` (so ``~/.ssh/config``, agents, jump hosts and keys
work as they do in a terminal), with ``BatchMode`` (never a prompt) and, on POSIX, one shared
connection per host and run (``ControlMaster``). A remote step is the device program (``agent``
and its parts, standard library only) sent with the command and run by the device's Python.
"""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ...core.errors import ConfigError, EdgekdError

DEFAULT_REMOTE_DIR = "~/.cache/edgekd"
MARK = "EDGEKD-RESULT "  # the agent's one answer line on stdout
# the device program, in the order its parts run (they share one namespace there)
AGENT_PARTS = ("agent_base.py", "agent_clocks.py", "agent.py")
_LOADER = 'import base64,sys;exec(compile(base64.b64decode(sys.argv[1]),"edgekd-agent","exec"))'


class Interrupted(EdgekdError):
    """Ctrl-C during a remote bench. ``rows``: what was measured before, plus error rows."""

    exit_code = 130

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


class Failure(Exception):
    """One host's run failed at ``stage`` (see edgekd.bench.remote: STAGES)."""

    def __init__(self, stage: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.stage, self.message, self.hint = stage, message, hint

    def text(self) -> str:
        return " ".join((self.message.rstrip(".") + (f"; {self.hint}" if self.hint else "")).split())


# --- hosts and options -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Host:
    """A parsed ``[USER@]HOST[:PORT]``; ``label`` is the text as given (the table's host column)."""

    label: str
    host: str
    user: str | None = None
    port: int | None = None


def parse_host(text: str) -> Host:
    """``[USER@]HOST[:PORT]``, ``[USER@][IPV6]:PORT``, a bare IPv6 address or ``ssh://[USER@]HOST[:PORT]``.
    HOST may be a ``Host`` alias of ~/.ssh/config; USER and PORT, when given, override the config's."""
    label = text.strip()
    rest = label[len("ssh://"):] if label.startswith("ssh://") else label
    user = None
    if "@" in rest:
        user, _, rest = rest.rpartition("@")
        if not user:
            raise ConfigError(f"bad host {text!r}: empty user name before '@'", "use [USER@]HOST[:PORT]")
    port_text = None
    if rest.startswith("["):
        host, close, after = rest[1:].partition("]")
        if not close or (after and not after.startswith(":")):
            raise ConfigError(f"bad host {text!r}", "write an IPv6 address with a port as [ADDRESS]:PORT")
        port_text = after[1:] if after else None
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host = rest  # a name, or an IPv6 address without port
    if not host or host.startswith("-") or any(c.isspace() or c in "/'\"`$;&|<>" for c in host):
        raise ConfigError(f"bad host {text!r}", "use [USER@]HOST[:PORT], e.g. pi@raspberrypi.local or orin:2222")
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"bad port in host {text!r}", "a port is a number from 1 to 65535")
        port = int(port_text)
    return Host(label, host, user or None, port)


@dataclass(frozen=True)
class RemoteOptions:
    """How to reach and prepare the devices (the ``bench --host`` options)."""

    remote_python: str = "python3"  # interpreter on the device that makes the venv
    remote_dir: str = DEFAULT_REMOTE_DIR  # where bundles, wheels and venvs live on the device
    system_site_packages: bool = False  # the venv sees the device's own packages (JetPack's TensorRT)
    wheelhouse: Path | None = None  # ship these wheels; pip installs with --no-index from them
    set_clocks: bool = False  # apply the profile's clock settings for the run (sudo -n)
    ssh_config: Path | None = None  # ssh -F FILE
    ssh_options: tuple[str, ...] = ()  # ssh -o KEY=VALUE, before edgekd's own (ssh keeps the first value)
    connect_timeout: int = 10  # seconds (ssh ConnectTimeout)
    overrides: dict = field(default_factory=dict)  # bench settings given on the command line


# --- the device program ----------------------------------------------------------------------------------

def agent_source() -> str:
    """The program run on the device: AGENT_PARTS joined (standard library only, Python >= 3.10)."""
    here = Path(__file__).parent
    return "\n\n".join((here / name).read_text(encoding="utf-8") for name in AGENT_PARTS)


def agent_namespace() -> dict:
    """The device program's functions, loaded here as the device loads them (for tests)."""
    namespace = {"__name__": "edgekd_agent", "__package__": None}
    exec(compile(agent_source(), "edgekd-agent", "exec"), namespace)  # noqa: S102 (our own source)
    return namespace


# --- what ssh's messages mean ----------------------------------------------------------------------------

_UNREACHABLE = ("could not resolve hostname", "name or service not known", "temporary failure in name resolution",
                "connection refused", "connection timed out", "operation timed out", "no route to host",
                "network is unreachable", "connection reset", "kex_exchange_identification", "connection closed by",
                "banner exchange")


def last_line(lines: Sequence[str]) -> str:
    useful = [line for line in lines if line.strip() and not line.startswith("Warning: Permanently added")]
    return useful[-1].strip() if useful else ""


def ssh_failure(label: str, tail: Sequence[str], connected: bool, doing: str) -> Failure:
    """What ssh's own exit status 255 means, from its messages."""
    text = " ".join(tail).lower()
    said = last_line(tail) or "ssh exited with status 255"
    if "permission denied" in text or "too many authentication failures" in text:
        return Failure("auth", f"{label} refused the login: {said}",
                       f"`ssh {label}` must log in without a prompt (a key in the agent or IdentityFile in "
                       "~/.ssh/config; ssh-copy-id installs one)")
    if "host key verification failed" in text or "remote host identification has changed" in text:
        return Failure("host key", f"{label}: host key unknown or changed: {said}",
                       f"connect once with `ssh {label}` to check and accept its key")
    if connected:
        return Failure("interrupted", f"the connection to {label} was lost while {doing}: {said}",
                       "run again: finished uploads are reused, partial ones are discarded")
    if any(p in text for p in _UNREACHABLE):
        return Failure("unreachable", f"cannot connect to {label}: {said}",
                       "check the host name, port and network; `ssh HOST true` must work")
    return Failure("unreachable", f"ssh to {label} failed: {said}")


def remote_path_expr(path: str) -> str:
    """A shell word for a path on the device; a leading ~/ becomes "$HOME"/."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


# --- one host's connection ---------------------------------------------------------------------------------

@dataclass
class Result:
    rc: int
    out: str
    err: list[str]


def _close(stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


class Connection:
    """ssh to one host; every call after the first reuses its connection (ControlMaster)."""

    def __init__(self, host: Host, options: RemoteOptions, control_dir: str | None, log: Callable[[str], None]):
        self.host, self.options, self.control_dir, self.log = host, options, control_dir, log
        self.connected = False
        self.proc: subprocess.Popen | None = None  # the ssh process of the current call
        self.agent_b64 = base64.b64encode(agent_source().encode()).decode()

    def argv(self, *ssh_args: str) -> list[str]:
        o = self.options
        argv = ["ssh"] + (["-F", str(o.ssh_config)] if o.ssh_config else [])
        for option in o.ssh_options:  # ssh keeps the first value of an option: the user's come first
            argv += ["-o", option]
        argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={o.connect_timeout}",
                 "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if self.control_dir:
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_dir}/%C",
                     "-o", "ControlPersist=120"]
        argv += ["-l", self.host.user] if self.host.user else []
        argv += ["-p", str(self.host.port)] if self.host.port else []
        return argv + list(ssh_args)

    def _readers(self, proc, out: list, tail: deque, stream: bool) -> list[threading.Thread]:
        def read_out():
            out.append(proc.stdout.read())

        def read_err():
            for raw in iter(proc.stderr.readline, b""):
                line = raw.decode(errors="replace").rstrip()
                tail.append(line)
                if stream and line:
                    self.log(f"{self.host.label}: {line}")

        readers = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
        for t in readers:
            t.start()
        return readers

    def call(self, command: str, doing: str, upload: Callable[[Any], None] | None = None, stream: bool = False,
             keep_stdin: bool = False, timeout: float | None = None) -> Result:
        """Run ``command`` there. ``upload`` writes stdin; ``keep_stdin`` holds stdin open until the
        command ends (the agent stops when it closes); ``stream`` logs stderr lines as they come."""
        proc = self.proc = subprocess.Popen(self.argv("--", self.host.host, command), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out: list[bytes] = []
        tail: deque[str] = deque(maxlen=60)
        readers = self._readers(proc, out, tail, stream)
        try:
            if upload is not None:
                try:
                    upload(proc.stdin)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the far end went away: its exit status and messages say why
                finally:
                    _close(proc.stdin)
            elif not keep_stdin:
                _close(proc.stdin)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise Failure("interrupted", f"{self.host.label} did not answer within {timeout:.0f} s while {doing}")
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        finally:
            _close(proc.stdin)
            for t in readers:
                t.join(timeout=5)
        result = Result(rc, b"".join(out).decode(errors="replace"), list(tail))
        if rc == 255:
            raise ssh_failure(self.host.label, result.err, self.connected, doing)
        self.connected = True
        return result

    def agent(self, python: str, command: str, args: dict, doing: str, stage: str, **kw) -> dict:
        """Run an agent command there; its answer, or Failure at ``stage`` (or the agent's stage)."""
        payload = base64.b64encode(json.dumps(args).encode()).decode()
        line = f"{python} -c {shlex.quote(_LOADER)} {self.agent_b64} {command} {payload}"
        result = self.call(line, doing, **kw)
        answers = [x[len(MARK):] for x in result.out.splitlines() if x.startswith(MARK)]
        if not answers:
            said = last_line(result.err) or f"exit status {result.rc}"
            if result.rc < 0 or result.rc > 128 or "Killed" in said:
                raise Failure("interrupted", f"the edgekd agent on {self.host.label} stopped while {doing}: {said}")
            raise Failure(stage, f"{doing} on {self.host.label} failed: {said}")
        answer = json.loads(answers[-1])
        if not answer.get("ok"):
            raise Failure(answer.get("stage") or stage, answer.get("message") or f"{doing} failed", answer.get("hint"))
        return answer

    def close(self) -> None:
        if not self.control_dir:
            return
        try:
            subprocess.run(self.argv("-O", "exit", "--", self.host.host), stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            pass
