"""The click group every command hangs from: one ``error:`` line and a non-zero exit for every user
error, never a traceback."""

from __future__ import annotations

import logging
import sys
import warnings

import click

from .. import __version__
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
        try:
            with as_interrupts():
                return super().invoke(ctx)
        except EdgekdError as e:
            click.echo(f"error: {e.one_line()}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            term = isinstance(e, Terminated)
            click.echo(f"error: interrupted by {'SIGTERM' if term else 'SIGINT'}", err=True)
            sys.exit(143 if term else 130)


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
