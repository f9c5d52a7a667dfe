"""``bench_remote``: bench bundles on each host over SSH, one host after the other.

Per host: check its Python, probe what it has (and clean what a dead run left), upload what is
missing, prepare the environment once, bench there, bring the rows back. A failing host yields
error rows naming the stage; the other hosts still run. Ctrl-C raises ``Interrupted``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import edgekd

from ...core.errors import ConfigError, EdgekdError, MissingFileError
from . import plan as planning
from .plan import Plan
from .rows import error_row, host_rows, warnings
from .ssh import (Connection, Failure, Host, Interrupted, RemoteOptions, check_remote_dir, last_line, parse_host,
                  remote_path_expr)

ENV_BYTES = 400_000_000  # what a fresh venv with numpy, onnxruntime and pip's cache takes, roughly
SPACE_MARGIN = 20_000_000
SYSFS = "/sys"  # where the device's agent looks for cpufreq (tests point it at a fake tree)
Log = Callable[[str], None]


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e6:.1f} MB"


def _names(requirements) -> list[str]:
    return [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in requirements]


def _runtime_hint(plan: Plan, options: RemoteOptions, machine: str | None, python: str | None) -> str:
    version = "".join((python or "3.11").split(".")[:2])
    fill = (f"pip download --only-binary=:all: --platform manylinux2014_{machine or 'aarch64'} --python-version "
            f"{version} -d DIR " + " ".join(shlex.quote(r.split(";")[0]) for r in plan.requirements))
    if options.wheelhouse is not None:
        hint = f"the wheelhouse lacks a wheel the device needs; fill it here with: {fill}"
    else:
        hint = f"the device needs to reach PyPI, or pass --wheelhouse DIR filled here with: {fill}"
    if "tensorrt" in plan.backends and not options.system_site_packages:
        hint = "TensorRT on a Jetson comes with JetPack: pass --system-site-packages; or " + hint
    return hint


class _HostRun:
    """One host's steps; ``doing`` says which one runs (for the Ctrl-C message)."""

    def __init__(self, host: Host, plan: Plan, options: RemoteOptions, control_dir: str | None, log: Log):
        self.host, self.plan, self.options, self.log = host, plan, options, log
        self.conn = Connection(host, options, control_dir, log)
        self.python = remote_path_expr(options.remote_python)
        self.facts: dict = {}
        self.doing = "connecting"
        self.common = {"dir": options.remote_dir, "version": edgekd.__version__,
                       "system_site": options.system_site_packages}

    def check_python(self) -> None:
        self.doing = "connecting"
        self.log(f"{self.host.label}: connecting")
        o, label = self.options, self.host.label
        result = self.conn.call(f"{self.python} --version", self.doing,
                                timeout=o.connect_timeout + min(60.0, o.step_timeout))
        match = re.search(r"Python (\d+)\.(\d+)(?:\.(\d+))?", result.out + "\n" + "\n".join(result.err))
        if match is None or result.rc != 0:
            raise Failure("python", f"no Python at {o.remote_python!r} on {label} "
                                    f"({last_line(result.err) or f'exit status {result.rc}'})",
                          "install Python >= 3.10 there or pass --remote-python PATH")
        version = ".".join(g for g in match.groups() if g is not None)
        self.facts["python"] = version
        if (int(match.group(1)), int(match.group(2))) < (3, 10):
            raise Failure("python", f"{label} has Python {version} at {o.remote_python}, edgekd needs Python >= 3.10",
                          "install Python 3.10 or newer there and pass --remote-python PATH")

    def probe_and_upload(self) -> dict:
        """What the device has; then what it lacks goes up in one stream. Returns the probe."""
        self.doing = "checking what the device has"
        label, items = self.host.label, self.plan.items
        probe = self.conn.agent(self.python, "probe", dict(self.common, items=[i.wire() for i in items]), self.doing,
                                "upload", timeout=self.options.connect_timeout + self.options.step_timeout)
        self.facts["machine"] = probe.get("machine")
        if probe.get("cleaned"):
            self.log(f"{label}: removed {len(probe['cleaned'])} unfinished upload(s) of an earlier run")
        missing = [i for i in items if i.path not in probe["present"]]
        need = sum(i.size for i in missing) + (0 if probe["env_ready"] else ENV_BYTES)
        if probe["free"] < need + SPACE_MARGIN:
            raise Failure("space", f"{label} has {_mb(probe['free'])} free in {probe['root']}, about "
                                   f"{_mb(need + SPACE_MARGIN)} are needed",
                          "free some space there, or pass --remote-dir on a larger disk")
        if missing:
            self.doing = "uploading"
            what = ", ".join(i.path.split("/")[0].rstrip("s") + " " + i.path.rsplit("/", 1)[-1] for i in missing)
            self.log(f"{label}: uploading {len(missing)} item(s), {_mb(sum(i.size for i in missing))}: {what}")
            self.conn.agent(self.python, "receive", dict(self.common, items=[i.wire() for i in missing]), self.doing,
                            "upload", upload=lambda stream: planning.write_upload(stream, missing))
        return probe

    def bench(self, probe: dict) -> list[dict]:
        plan, label = self.plan, self.host.label
        self.doing = "preparing the environment" if not probe["env_ready"] else "benchmarking"
        if not probe["env_ready"]:
            self.log(f"{label}: preparing {probe['root']}/{edgekd.__version__}/ (a venv with "
                     f"{', '.join(_names(plan.requirements))}): first run only")
        args = dict(self.common, requirements=plan.requirements, wheel=plan.wheel.path, wheel_key=plan.wheel.sha256,
                    wheelhouse=self.options.wheelhouse is not None, profile=plan.profile,
                    bundles=[r.item.path for r in plan.refs if r.item is not None],
                    bench_args=plan.bench_args, clocks=plan.clocks, sysfs=SYSFS)
        try:
            answer = self.conn.agent(self.python, "run", args, "benchmarking", "bench", stream=True, keep_stdin=True)
        except Failure as f:
            if f.stage == "runtime" and f.hint is None:
                f.hint = _runtime_hint(plan, self.options, self.facts.get("machine"), self.facts.get("python"))
            raise
        rows = host_rows(self.host, plan, probe["root"], answer)
        for line in warnings(label, rows, self.options.set_clocks):
            self.log(line)
        return rows

    def rows(self) -> list[dict]:
        """Every step; a Failure becomes one error row per bundle naming the host and the stage."""
        refs = self.plan.refs
        if all(ref.item is None for ref in refs):  # nothing to ship: no need to connect
            return [error_row(self.host, ref, "bench", ref.error) for ref in refs]
        try:
            self.check_python()
            return self.bench(self.probe_and_upload())
        except Failure as f:
            self.log(f"{self.host.label}: {f.stage}: {f.text()}")
            return [error_row(self.host, ref, f.stage, f.text(), self.facts) if ref.error is None
                    else error_row(self.host, ref, "bench", ref.error) for ref in refs]
        finally:
            self.conn.close()


def _check_inputs(hosts: Sequence[str], bundles: Sequence[Path], options: RemoteOptions) -> list[Host]:
    targets = [parse_host(h) for h in hosts]
    check_remote_dir(options.remote_dir)
    if not isinstance(options.step_timeout, (int, float)) or not options.step_timeout > 0:
        raise ConfigError(f"bad step timeout {options.step_timeout!r}", "a number of seconds above 0")
    for flag, text in [("--remote-python", options.remote_python)] + [("--ssh-option", o) for o in options.ssh_options]:
        if not text.strip() or any(not c.isprintable() for c in text):
            raise ConfigError(f"bad {flag} {text!r}", "it must not be empty or hold control characters")
    if not targets:
        raise ConfigError("no host given", "pass --host [USER@]HOST[:PORT]")
    if not bundles:
        raise MissingFileError("no bundle to bench", "pass bundle directories written by `edgekd export`")
    if shutil.which("ssh") is None:
        raise EdgekdError("the OpenSSH client (ssh) is not installed here",
                          "install it (apt install openssh-client), or bench on the device by hand (README)")
    if options.ssh_config is not None and not Path(options.ssh_config).is_file():
        raise MissingFileError(f"ssh config file not found: {options.ssh_config}")
    return targets


def bench_remote(hosts: Sequence[str], bundles: Sequence[Path], profile=None, options: RemoteOptions | None = None,
                 log: Log | None = None, cache: Path | None = None) -> list[dict]:
    """Bench ``bundles`` (local bundle folders) on each of ``hosts`` over SSH; the rows of all hosts
    in order. ``profile``: the catalog Profile (its file is shipped; None = bench defaults).
    ``cache``: the local wheel cache (default ~/.cache/edgekd). Raises EdgekdError for what stops
    every host (a bad host name, no ssh client) and Interrupted on Ctrl-C."""
    options = options or RemoteOptions()
    log = log or (lambda message: None)
    targets = _check_inputs(hosts, bundles, options)
    plan = planning.make_plan(bundles, profile, options, cache)
    control_dir = None
    if os.name == "posix":  # OpenSSH for Windows has no connection sharing
        # a short path: a unix socket path is limited to about 100 bytes
        control_dir = tempfile.mkdtemp(prefix="edgekd-ssh-", dir="/tmp" if os.path.isdir("/tmp") else None)
    rows: list[dict] = []
    try:
        for n, host in enumerate(targets):
            run = _HostRun(host, plan, options, control_dir, log)
            try:
                rows += run.rows()
            except KeyboardInterrupt:
                rows += [error_row(host, ref, "interrupted", "interrupted (Ctrl-C) while " + run.doing)
                         for ref in plan.refs]
                for rest in targets[n + 1:]:
                    rows += [error_row(rest, ref, "interrupted", "not started: the run was interrupted")
                             for ref in plan.refs]
                raise Interrupted(f"interrupted on {host.label} while {run.doing} (Ctrl-C); nothing partial is kept "
                                  "there, the next run starts clean", rows) from None
    finally:
        if control_dir:
            shutil.rmtree(control_dir, ignore_errors=True)
    return rows
