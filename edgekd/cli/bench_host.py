"""``edgekd bench --host``: the options that bench on a device over SSH, and how its rows are shown
(the local bench table with a ``host`` column and one footer line per host). The work is in
edgekd.bench.remote."""

from __future__ import annotations

from pathlib import Path

import click

from . import common as c

HOST_OPTIONS = ("hosts", "remote_python", "remote_dir", "system_site_packages", "wheelhouse", "set_clocks",
                "ssh_config", "ssh_options", "connect_timeout")


def host_options(f):
    """The ``--host`` options of ``bench`` (HOST_OPTIONS are their parameter names)."""
    for decorator in reversed([
        click.option("--host", "hosts", multiple=True, metavar="[USER@]HOST[:PORT]",
                     help="Bench on this device over SSH (repeatable: one table); names from ~/.ssh/config work."),
        click.option("--remote-python", default="python3", show_default=True, metavar="PATH",
                     help="With --host: the device's Python (>= 3.10) that makes the environment."),
        click.option("--remote-dir", default="~/.cache/edgekd", show_default=True, metavar="DIR",
                     help="With --host: where bundles, the wheel and the venv live on the device: a new or empty "
                          "folder, or one edgekd made (not a link; a folder holding other files is refused)."),
        click.option("--system-site-packages", is_flag=True,
                     help="With --host: the venv also sees the device's packages (JetPack's TensorRT)."),
        click.option("--wheelhouse", type=click.Path(file_okay=False, exists=True, path_type=Path), metavar="DIR",
                     help="With --host: install on the device only from these wheels (no index; air-gapped devices)."),
        click.option("--set-clocks", is_flag=True,
                     help="With --host: apply the profile's [clocks] for the run (sudo -n), then restore them."),
        click.option("--ssh-config", type=click.Path(dir_okay=False, exists=True, path_type=Path), metavar="FILE",
                     help="With --host: ssh -F FILE."),
        click.option("--ssh-option", "ssh_options", multiple=True, metavar="KEY=VALUE",
                     help="With --host: passed to ssh as -o KEY=VALUE (repeatable)."),
        click.option("--connect-timeout", type=c.AsciiIntRange(min=1, max=3600), default=10, show_default=True,
                     metavar="SECONDS", help="With --host: ssh ConnectTimeout."),
    ]):
        f = decorator(f)
    return f


def split_host_options(kwargs: dict) -> dict:
    """Take the --host options out of ``kwargs`` (the rest are bench settings)."""
    return {name: kwargs.pop(name) for name in HOST_OPTIONS}


def bench_on_hosts(paths, prof, overrides: dict, remote: dict, outputs: dict, strict: bool) -> int:
    """Bench ``paths`` on the hosts over SSH; print the table, write ``outputs`` (json, csv,
    markdown, plot paths); return bench's exit code. A Ctrl-C still shows what was measured."""
    from ..bench import remote as rb
    from ..bench import report

    remote = dict(remote)
    hosts, ssh_options = remote.pop("hosts"), tuple(remote.pop("ssh_options"))
    options = rb.RemoteOptions(**remote, ssh_options=ssh_options, overrides=overrides)
    try:
        rows = rb.bench_remote(hosts, paths, prof, options, log=lambda m: click.echo(m, err=True))
    except rb.Interrupted as e:
        click.echo(report.render_table(e.rows, rb.TABLE_COLUMNS, rb.footer(e.rows)), nl=False)
        raise
    extra, footer = rb.TABLE_COLUMNS, rb.footer(rows)
    click.echo(report.render_table(rows, extra, footer), nl=False)
    for path in report.write_outputs(rows, outputs["json"], outputs["csv"], outputs["markdown"], extra, footer):
        click.echo(f"wrote {path}", err=True)
    if outputs["plot"]:
        click.echo(f"wrote {report.plot(rows, outputs['plot'], prof.budgets if prof else None)}", err=True)
    return rb.exit_code(rows, strict)
