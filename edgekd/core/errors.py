"""Typed user errors.

Core code raises these; the CLI turns each into one line on stderr and exit code 2,
without a traceback. Every error names the problem and, in ``hint``, the fix.
"""

from __future__ import annotations

from typing import NamedTuple


class EdgekdError(Exception):
    """An error caused by the user's input or environment, not by a bug in edgekd."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += f"; {self.hint}"
        return " ".join(text.split())


class UnknownNameError(EdgekdError):
    """A name that is not in a registry (dataset, model, target, profile, loss...)."""


class ConfigError(EdgekdError):
    """A TOML file or option value that does not validate."""


class MissingFileError(EdgekdError):
    """A path the user named does not exist or cannot be read."""


class CheckpointError(EdgekdError):
    """A checkpoint that is unsafe, corrupt, or does not fit the architecture."""


class MissingExtraError(EdgekdError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed",
            f"install it with: pip install 'edgekd[{extra}]'",
        )


class ParityError(EdgekdError):
    """An exported artifact disagrees with the PyTorch model beyond the target's tolerance."""

    exit_code = 3


class DiskFullError(EdgekdError):
    """No space left (or the quota reached) on the disk being written; nothing half-written is kept."""


class IncompatibleError(EdgekdError):
    """Two inputs that cannot be used together (e.g. teacher and student class counts)."""


class WorkerFailure(NamedTuple):
    """An edgekd error met in a DataLoader worker process, sent back as data and raised in the main
    process (a worker's exception would come back wrapped in its traceback, not as the one-line error)."""

    message: str
    hint: str | None

    @classmethod
    def catching(cls, read):
        """``read()``, or the WorkerFailure of the EdgekdError it raised."""
        try:
            return read()
        except EdgekdError as e:
            return cls(e.message, e.hint)

    def raise_(self):
        raise ConfigError(self.message, self.hint) from None
