"""What the commands share: log lines, and click options built from the one options table.

``flag(name)`` makes a click option from ``edgekd.config.options.OPTIONS``: its spelling, default,
help and bounds come from the table, and the table's ``check`` words every bad value, so a bound is
checked once and worded once for the CLI, recipes, profiles and the Python API.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from ..config import options as op
from ..core.errors import EdgekdError


def log(line: str) -> None:
    click.echo(line, err=True)


def logger(quiet: bool):
    """Log lines go to stderr; with --quiet only warnings do."""
    return (lambda s: log(s) if s.startswith("warning") else None) if quiet else log


def _checked(name: str):
    """A click callback checking the parsed value against the table (an EdgekdError: one line)."""
    def callback(ctx, param, value):
        if value is None or (param.multiple and not value):
            return value
        return op.check(name, list(value) if param.multiple else value, param.opts[0])
    return callback


class AsciiNumber(click.ParamType):
    """An integer or a float written in ASCII: Python's int() and float() (what click uses) also read
    other scripts' digits ('８', '٤') and underscores ('1_0'), which no recipe, log or other tool reads
    the same way; the TOML files refuse them too."""

    def __init__(self, kind: type):
        self.kind, self.name = kind, "integer" if kind is int else "float"

    def convert(self, value, param, ctx):
        if isinstance(value, self.kind) and not isinstance(value, bool):
            return value
        text = str(value)
        _ascii_only(self, text, self.name, param, ctx)
        return (click.INT if self.kind is int else click.FLOAT).convert(text, param, ctx)


def _ascii_only(kind: click.ParamType, text: str, name: str, param, ctx) -> None:
    """Fail ``kind``'s conversion of ``text`` unless it is ASCII without underscores (AsciiNumber)."""
    if not text.isascii() or "_" in text:
        kind.fail(f"{op.shown(text, 40)} is not a valid {name} (ASCII digits only)", param, ctx)


INT, FLOAT = AsciiNumber(int), AsciiNumber(float)


class AsciiIntRange(click.IntRange):
    """click.IntRange, written in ASCII digits only (as AsciiNumber)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            _ascii_only(self, value, "integer", param, ctx)
        return super().convert(value, param, ctx)


def flag(name: str, *decls: str, **overrides):
    """A click option for table entry ``name``; ``decls``: extra spellings such as ``-T``, or, when one
    starts with ``--``, the spellings to use instead of the table's (``--warmup-time``)."""
    o = op.OPTIONS[name]
    kinds = o.kind if isinstance(o.kind, tuple) else (o.kind,)
    kind = float if float in kinds else int if int in kinds else str
    settings = dict(default=o.default, show_default=o.default is not None, type=kind, help=o.help,
                    metavar=o.metavar, callback=_checked(name))
    if o.choices:
        settings["type"] = click.Choice([str(c) for c in o.choices])
    settings.update(overrides)
    settings["type"] = {int: INT, float: FLOAT}.get(settings["type"], settings["type"])
    settings["show_default"] = settings["default"] is not None
    spellings = decls if any(d.startswith("--") for d in decls) else (o.flag, *decls)
    return click.option(*spellings, name, **settings)


def first_last_bits(text: str) -> int | str:
    """--first-last-bits: 'same' or an integer from the table's bit range (ASCII digits only)."""
    value = text if text == op.SAME else int(text) if re.fullmatch(r"[0-9]{1,3}", text) else text
    return op.check("first_last_bits", value)


def bits(bits_: int, weight_bits: int | None, act_bits: int | None) -> tuple[int, int]:
    """--bits sets both; --weight-bits / --act-bits override one side (each checked under its name)."""
    return (weight_bits if weight_bits is not None else bits_), (act_bits if act_bits is not None else bits_)


def bit_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        values = [int(b) if b.isascii() and "_" not in b else int("not ASCII") for b in text.split(",")]
    except ValueError:
        raise EdgekdError(f"--bit-schedule takes comma-separated integers, got {text!r}", "e.g. --bit-schedule 8,4") \
            from None
    return op.check("bit_schedule", values, "--bit-schedule")


def params(items) -> dict:
    """--param KEY=VALUE pairs; values parse as TOML (numbers, strings, lists), else stay strings. A value
    past the TOML reader's limits (deep nesting, an integer of thousands of digits) is one error."""
    from ..config import tomlfile

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise EdgekdError(f"--param takes KEY=VALUE, got {op.shown(item)}", "e.g. --param beta=8")
        if key in out:  # the last would win silently
            raise EdgekdError(f"--param {op.shown(key, 40)} is given twice", "give each parameter once")
        try:
            out[key] = tomlfile.value(value, f"--param {op.shown(key, 40)}")
        except tomlfile.DecodeError:
            out[key] = value
    return out


class OutPath(click.ParamType):
    """A path to write: '' is a usage error (click would read it as the current directory)."""

    name = "path"

    def convert(self, value, param, ctx):
        if isinstance(value, Path):
            return value
        if value == "":
            raise click.UsageError(f"{param.opts[0] if param else 'the path'} must not be empty", ctx)
        return Path(value)


class InPath(OutPath):
    """A path to read: '' is a usage error too (not the current directory)."""


def out_option(*decls: str, **settings):
    """An output path option (``--out``, ``--json``...); the pipeline checks it (core.fsutil.check_output)."""
    return click.option(*decls, type=OutPath(), **settings)


overwrite_opt = click.option(
    "--overwrite", is_flag=True,
    help="Replace an output path edgekd did not write. Never replaced: a folder holding other runs or bundles, "
         "the current directory or its parents, the input, a device, FIFO or socket.")
trust_code_opt = click.option(
    "--trust-code", is_flag=True,
    help="Build models that files (checkpoints, recipes) name as module:callable: imports and runs that code. "
         "Without it only the command line may name code.")
layer_bits_opt = click.option("--layer-bits", "layer_bits", multiple=True, metavar="PATTERN=WxAy",
                              help=op.OPTIONS["layer_bits"].help)
data_opt = flag("data")
seed_opt = flag("seed")
quiet_opt = click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines.")


def data_opts(f):
    """How the data is read (normalization for every dataset; image folders' size, channels,
    augmentation, workers and bad files), shared by train, distill and sweep."""
    for decorator in reversed([
        flag("normalize"), flag("image_size"), flag("channels", type=click.Choice(["1", "3"]),
                                                    callback=lambda ctx, p, v: None if v is None else int(v)),
        flag("augment"), flag("workers"), flag("image_cache"),
        click.option("--skip-bad-images", is_flag=True, help=op.OPTIONS["skip_bad_images"].help)]):
        f = decorator(f)
    return f


def training_opts(f):
    """--device, --amp, --resume and --tensorboard, shared by train and distill."""
    f = click.option("--tensorboard", is_flag=True,
                     help="Also write TensorBoard events as epochs finish, into tensorboard/NAME next to the run "
                          "dir (needs: pip install 'edgekd[tensorboard]').")(f)
    f = click.option("--resume", is_flag=True,
                     help="Continue the interrupted run with the same options and --out from its checkpoint "
                          "(OUT.partial, written every epoch and on Ctrl-C / SIGTERM).")(f)
    f = click.option("--amp", is_flag=True, help=op.OPTIONS["amp"].help)(f)
    return flag("device")(f)
