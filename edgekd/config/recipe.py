"""Distillation recipes: a TOML file with a weighted list of loss terms and, optionally, any
``distill`` option (``scheme``, ``order``, ``epochs``, ...) at the top level.

    # kd.toml
    scheme = "offline"
    order = "float-first"

    [[loss]]
    name = "ce"
    weight = 1.0

    [[loss]]
    name = "dkd"          # alpha, beta, temperature: paper defaults unless set
    beta = 8.0

    [[loss]]
    name = "at"           # layers by module path; omitted: chosen automatically
    weight = 1000.0
    student = ["5", "8"]
    teacher = ["3.relu", "5.relu"]

A term's ``weight`` defaults to its paper weight (``losses.Term.weight``). Unknown keys, methods and
parameters fail with a did-you-mean. Options given on the command line override the file's.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

from ..core.errors import ConfigError, MissingFileError
from ..core.registry import suggest
from . import options as op

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOSS_KEY = "loss"


def option_names() -> list[str]:
    return [f.name for f in fields(op.DistillOptions) if f.name not in ("progress", "config", "loss")]


def parse(text: str, source: str = "recipe") -> tuple[dict, list[dict]]:
    """(options, loss term specs) of a recipe's text. Options are checked against the options table;
    each term must be a table with a ``name`` (its parameters are checked by ``kd.check_terms``)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}") from None
    allowed = option_names() + [LOSS_KEY]
    for key in doc:
        if key not in allowed:
            raise ConfigError(f"{source}: unknown key {key!r}{suggest(key, allowed)}",
                              f"top-level keys: {LOSS_KEY} (a [[loss]] list) and the distill options "
                              f"{', '.join(option_names())}")
    for key, value in doc.items():
        if key != LOSS_KEY:
            op.check(key, value, f"{source}: {key}")
    terms = doc.get(LOSS_KEY, [])
    if not isinstance(terms, list) or not all(isinstance(t, dict) for t in terms):
        raise ConfigError(f"{source}: 'loss' must be a list of tables ([[loss]] sections)")
    if len(terms) > op.MAX_LOSS_TERMS:
        raise ConfigError(f"{source}: too many [[loss]] terms ({len(terms)}; at most {op.MAX_LOSS_TERMS})",
                          "combine terms of the same method into one with a larger weight")
    options = {k: v for k, v in doc.items() if k != LOSS_KEY}
    return options, terms


def read(path: str | Path) -> str:
    """The text of a recipe file (UTF-8), or one error naming what is wrong with the path."""
    path = Path(path)
    if path.is_dir():
        raise MissingFileError(f"recipe {path} is a directory", "pass a .toml file to --config")
    if not path.is_file():
        raise MissingFileError(f"recipe not found: {path}", "pass a .toml file to --config")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start})", "save the recipe as UTF-8") from None
    return text


def apply(opts, options: dict, explicit: set[str] | None = None):
    """``opts`` with the recipe's options, except those the user set explicitly (``explicit``)."""
    from dataclasses import replace

    keep = explicit or set()
    return replace(opts, **{k: v for k, v in options.items() if k not in keep})
