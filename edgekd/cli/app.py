"""The click group every command hangs from: one ``error:`` line and a non-zero exit for every user
error, never a traceback."""

from __future__ import annotations

import logging
import sys
import warnings

import click

from .. import __version__
from ..core import interrupts
from ..core.errors import EdgekdError
from ..core.interrupts import Terminated, as_interrupts


def _one_line(message: str) -> str:
    return " ".join(message.split()).rstrip(".")


class EdgekdGroup(click.Group):
    """Every user error ends as one ``error:`` line on stderr and a non-zero exit, never a traceback:
    edgekd's own (EdgekdError, exit 2 or its own code) and click's usage errors (exit 2)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:  # a program calling main(): click's own semantics, return the result
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            where = f"; see '{e.ctx.command_path} --help'" if e.ctx else ""
            click.echo(f"error: {_one_line(e.format_message())}{where}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx):
        """Run the command; a signal received meanwhile ends it with 128 + the signal's number (130
        SIGINT, 143 SIGTERM) and one line, whatever exception it surfaced as (core.interrupts)."""
        with as_interrupts():
            try:
                result = super().invoke(ctx)
            except (SystemExit, click.exceptions.Exit):
                raise
            except BaseException as e:  # noqa: BLE001 - every end is one line; anything else is re-raised
                _fail(e)
                raise
            name = interrupts.last(raised_only=True)  # an interrupt dropped on its way up: nothing was committed
            if name is not None:
                _exit(f"interrupted by {name}", interrupts.exit_code(name))
            return result


def _exit(line: str, code: int) -> None:
    interrupts.settle()
    click.echo(f"error: {line}", err=True)
    sys.exit(code)


def _fail(e: BaseException) -> None:
    """End the command for exception ``e`` with one line, or return (the caller re-raises it)."""
    name = interrupts.last()
    if name is not None:  # interrupted: the exception is what the signal became (an ImportError around an import...)
        own = isinstance(e, EdgekdError) and e.exit_code == 130  # edgekd's own report of the interruption
        _exit(e.one_line() if own else f"interrupted by {name}", interrupts.exit_code(name))
    if isinstance(e, EdgekdError):
        _exit(e.one_line(), e.exit_code)
    if isinstance(e, KeyboardInterrupt):  # raised by other code than edgekd's handler
        term = isinstance(e, Terminated)
        _exit(f"interrupted by {'SIGTERM' if term else 'SIGINT'}", 143 if term else 130)


@click.group(cls=EdgekdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekd")
def main():
    """Quantized knowledge distillation for edge devices: distill, export, bench."""
    _quiet_third_party()


def _quiet_third_party() -> None:
    """Keep import-time chatter of torch/Brevitas off the terminal (none of it concerns the user:
    a CPU-only machine without CUDA, an optional Hadamard kernel, Brevitas's fx deprecation)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for message in ("fast_hadamard_transform", "brevitas.fx is deprecated", ".*treespec.children_specs",
                    "Defining your `__torch_function__`", "Named tensors"):
        warnings.filterwarnings("ignore", message=message)
