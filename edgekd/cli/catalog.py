"""``edgekd targets``, ``edgekd profiles`` and ``edgekd check``: the catalog and the pre-flight."""

from __future__ import annotations

import shutil
import sys

import click

from . import common as c
from . import render
from .app import main


def _echo(lines: list[str]) -> None:
    for line in lines:
        click.echo(line)


def _width() -> int | None:
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


@main.group("targets")
def targets_group():
    """Deployment targets: how an artifact is produced and run (targets/*.toml)."""


@targets_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every field of every target).")
def targets_list(as_json):
    """List the targets in the catalog."""
    from .. import catalog

    targets = catalog.list_targets()
    if as_json:
        return click.echo(render.as_json([catalog.as_dict(t) for t in targets]))
    _echo(render.table([render.target_summary(t) for t in targets], render.TARGET_COLUMNS, _width()))


@targets_group.command("show")
@click.argument("name", metavar="NAME|FILE.toml")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def targets_show(name, as_json):
    """Show one target: a name, an alias, a profile (its preferred target) or a .toml file."""
    from .. import catalog

    _, _, via = catalog.resolve_target(name)
    t = catalog.load_target(name)
    if as_json:
        return click.echo(render.as_json(catalog.as_dict(t)))
    _echo(render.target_detail(t, via))


@main.group("profiles")
def profiles_group():
    """Device profiles: hardware facts, targets, bench settings, budgets (profiles/*.toml)."""


@profiles_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every field of every profile).")
def profiles_list(as_json):
    """List the device profiles in the catalog."""
    from .. import catalog

    profiles = catalog.list_profiles()
    if as_json:
        return click.echo(render.as_json([catalog.as_dict(p) for p in profiles]))
    _echo(render.table([render.profile_summary(p) for p in profiles], render.PROFILE_COLUMNS, _width()))


@profiles_group.command("show")
@click.argument("name", metavar="NAME|FILE.toml")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def profiles_show(name, as_json):
    """Show one device profile (a name, an alias or a .toml file)."""
    from .. import catalog

    p = catalog.load_profile(name)
    if as_json:
        return click.echo(render.as_json(catalog.as_dict(p)))
    _echo(render.profile_detail(p))


@main.command("check")
@click.option("--target", required=True, metavar="NAME|FILE.toml", help="Target name, alias, profile or .toml file.")
@click.option("--student", metavar="SPEC", help="Student architecture (recorded in the JSON output).")
@click.option("--bits", default=8, show_default=True, type=c.INT, help="Weight and activation bits.")
@click.option("--weight-bits", type=c.INT, help="Weight bits, overriding --bits.")
@click.option("--act-bits", type=c.INT, help="Activation bits, overriding --bits.")
@c.layer_bits_opt
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check_command(target, student, bits, weight_bits, act_bits, layer_bits, as_json):
    """Pre-flight, before training: what TARGET will not accept or not accelerate at these bits.

    Exits 2 when any finding is an error (the exported model would not run on the target).
    """
    from .. import catalog

    w, a = c.bits(bits, weight_bits, act_bits)
    t = catalog.load_target(target)
    found = catalog.preflight(t, w, a, list(layer_bits))
    errors = sum(f["level"] == "error" for f in found)
    if as_json:
        click.echo(render.as_json({"target": t.name, "weight_bits": w, "act_bits": a, "layer_bits": list(layer_bits),
                                   "student": student,
                                   "ok": errors == 0, "findings": found}))
    else:
        _echo(render.findings(t, w, a, found))
    if errors:
        click.echo(f"error: W{w}A{a} cannot be deployed to {t.name} ({errors} error{'s' * (errors > 1)})", err=True)
        sys.exit(2)
