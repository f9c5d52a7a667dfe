"""The connection to a device: hosts, options, the OpenSSH client, and what its failures mean.

Every call goes through the system ``ssh`` (so ``~/.ssh/config``, agents, jump hosts and keys
work as they do in a terminal), with ``BatchMode`` (never a prompt) and, on POSIX, one shared
connection per host and run (``ControlMaster``). A remote step is the device program (``agent``
and its parts, standard library only) sent with the command and run by the device's Python.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
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
PID_MARK = "EDGEKD-PID "  # the first stderr line of every call: the process (group) id there
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


def _show(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:60] + "...")


def parse_host(text: str) -> Host:
    """``[USER@]HOST[:PORT]``, ``[USER@][IPV6]:PORT``, a bare IPv6 address or ``ssh://[USER@]HOST[:PORT]``.
    HOST may be a ``Host`` alias of ~/.ssh/config; USER and PORT, when given, override the config's."""
    label = text.strip()
    rest = label[len("ssh://"):] if label.startswith("ssh://") else label
    user = None
    if any(not c.isprintable() for c in text):
        raise ConfigError(f"bad host {_show(text)}: it holds a control character", "use [USER@]HOST[:PORT]")
    if "@" in rest:
        user, _, rest = rest.rpartition("@")
        if not user or user.startswith("-") or any(c.isspace() for c in user):
            raise ConfigError(f"bad host {_show(text)}: bad user name before '@'", "use [USER@]HOST[:PORT]")
    port_text = None
    if rest.startswith("["):
        host, close, after = rest[1:].partition("]")
        if not close or (after and not after.startswith(":")):
            raise ConfigError(f"bad host {_show(text)}", "write an IPv6 address with a port as [ADDRESS]:PORT")
        port_text = after[1:] if after else None
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host = rest  # a name, or an IPv6 address without port
    if not host or host.startswith("-") or any(c.isspace() or c in "/'\"`$;&|<>" for c in host):
        raise ConfigError(f"bad host {_show(text)}", "use [USER@]HOST[:PORT], e.g. pi@raspberrypi.local or orin:2222")
    port = None
    if port_text is not None:
        port = parse_port(port_text, f"in host {_show(text)}")
    return Host(label, host, user or None, port)


def parse_port(text: str, where: str = "") -> int:
    """A TCP port written in ASCII digits, 1 to 65535 (``str.isdigit`` also takes '²' and '٢')."""
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 0 < int(text) < 65536:
        raise ConfigError(f"bad port {_show(text)}" + (f" {where}" if where else ""), "a port is a number from 1 to 65535")
    return int(text)


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
    step_timeout: float = 300.0  # seconds the probe may take there (the Python check: at most 60); then it is killed
    overrides: dict = field(default_factory=dict)  # bench settings given on the command line


def check_remote_dir(text: str) -> str:
    """``--remote-dir``: a folder of edgekd's own on the device (it deletes what it wrote there), so
    not empty, blank, '/', the login folder ('~', '.', '~user'), a top-level folder or one with '..'."""
    def bad(why: str):
        return ConfigError(f"--remote-dir {_show(text)} {why}",
                           "pass a folder of edgekd's own, e.g. ~/.cache/edgekd (the default) or /data/edgekd")

    if not text.strip():
        raise bad("is empty")
    if text != text.strip() or any(not c.isprintable() for c in text):
        raise bad("starts or ends with blanks or holds a control character")
    if "$" in text or "`" in text:
        raise bad("is not expanded by a shell there (write ~/ for the home folder)")
    home, rest = (text.partition("/")[0], text.partition("/")[2]) if text.startswith("~") else ("", text)
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise bad("contains '..'")
    if text.startswith("/") and not parts:
        raise bad("is the root folder")
    if not parts:
        raise bad(f"is the login folder{f' of {home[1:]}' if home[1:] else ''}")
    if text.startswith("/") and len(parts) < 2:
        raise bad("is a top-level folder")
    return text


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


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


class Connection:
    """ssh to one host; every call after the first reuses its connection (ControlMaster)."""

    def __init__(self, host: Host, options: RemoteOptions, control_dir: str | None, log: Callable[[str], None]):
        self.host, self.options, self.control_dir, self.log = host, options, control_dir, log
        self.connected = False
        self.proc: subprocess.Popen | None = None  # the ssh process of the current call
        self.agent_b64 = base64.b64encode(agent_source().encode()).decode()
        self.token = secrets.token_hex(8)  # marks the processes of this run there (EDGEKD_RUN)
        self.remote_pid: int | None = None  # of the current call: session and group leader there

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
                if line.startswith(PID_MARK) and self.remote_pid is None and line[len(PID_MARK):].isdigit():
                    self.remote_pid = int(line[len(PID_MARK):])
                    continue
                tail.append(line)
                if stream and line:
                    self.log(f"{self.host.label}: {line}")

        readers = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
        for t in readers:
            t.start()
        return readers

    def wrapped(self, command: str) -> str:
        """``command`` run by sh as the session leader there (sshd starts each session with setsid),
        after telling its id and marking it with this run's token, so that ``stop_remote`` can
        end it and its children. ``exec sh -c`` also keeps csh or fish login shells out of it."""
        inner = f"echo {PID_MARK}$$ >&2; EDGEKD_RUN={self.token}; export EDGEKD_RUN; exec {command}"
        return "exec sh -c " + shlex.quote(inner)

    def stop_remote(self, pid: int | None) -> str:
        """End the process group ``pid`` there (TERM, then KILL after 5 s) if it still carries this
        run's token; what happened, for the message."""
        if pid is None:
            return "no process of it was seen there"
        script = (f"p={pid}; if [ -r /proc/$p/environ ] && ! tr '\\0' '\\n' < /proc/$p/environ | "
                  f"grep -qx EDGEKD_RUN={self.token}; then echo gone; exit 0; fi; "
                  "kill -s TERM -- -$p 2>/dev/null || { echo gone; exit 0; }; "
                  "i=0; while [ $i -lt 10 ] && kill -s 0 -- -$p 2>/dev/null; do sleep 0.5; i=$((i+1)); done; "
                  "kill -s KILL -- -$p 2>/dev/null; echo stopped")
        try:
            done = subprocess.run(self.argv("--", self.host.host, "exec sh -c " + shlex.quote(script)),
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=self.options.connect_timeout + 15,
                                  check=False)
        except (OSError, subprocess.SubprocessError):
            return f"its process there (group {pid}) could not be stopped"
        said = done.stdout.decode(errors="replace").split()
        if done.returncode != 0 or not said:
            return f"its process there (group {pid}) could not be stopped"
        return f"its process there (group {pid}) was stopped" if said[-1] == "stopped" else "it has ended there"

    def call(self, command: str, doing: str, upload: Callable[[Any], None] | None = None, stream: bool = False,
             keep_stdin: bool = False, timeout: float | None = None) -> Result:
        """Run ``command`` there. ``upload`` writes stdin; ``keep_stdin`` holds stdin open until the
        command ends (the agent stops when it closes); ``stream`` logs stderr lines as they come.
        After ``timeout`` seconds, or on Ctrl-C while nothing there watches stdin, the command is
        ended there too (stop_remote), not only the ssh client here."""
        self.remote_pid = None
        proc = self.proc = subprocess.Popen(self.argv("--", self.host.host, self.wrapped(command)),
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
                _kill(proc)
                stopped = self.stop_remote(self.remote_pid)
                raise Failure("interrupted", f"{self.host.label} did not answer within {timeout:.0f} s while {doing}; "
                                             f"{stopped}", "check the device (a hung disk, or another edgekd run "
                                                           "holding its folder) and run again") from None
        except KeyboardInterrupt:
            if proc.poll() is None:
                _kill(proc)
                if upload is None and not keep_stdin:  # else the agent there sees stdin close and stops
                    self.stop_remote(self.remote_pid)
            raise
        except BaseException:
            if proc.poll() is None:
                _kill(proc)
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
