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

Per-layer bits (``edgekd.quant.layerbits``) are ``[[bits]]`` tables, applied in order (a later one
wins for the layers both name); ``--layer-bits`` rules on the command line come after them:

    [[bits]]
    type = "depthwise"    # or layers = "features.3.*" (module-path globs, a string or a list)
    weight = 8
    act = 8               # the activations the layer reads
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..core.errors import ConfigError, MissingFileError
from ..core.registry import suggest
from . import options as op, tomlfile

LOSS_KEY = "loss"
MAX_BYTES = 16 << 20  # a recipe is a page of TOML; a larger file is not one (read whole into memory)
BITS_KEY = "bits"  # [[bits]] tables: per-layer bit widths


def option_names() -> list[str]:
    return [f.name for f in fields(op.DistillOptions) if f.name not in ("progress", "config", "loss")]


def parse(text: str, source: str = "recipe") -> tuple[dict, list[dict]]:
    """(options, loss term specs) of a recipe's text. Options are checked against the options table;
    each term must be a table with a ``name`` (its parameters are checked by ``kd.check_terms``)."""
    doc = tomlfile.loads(text, source)  # nesting and integer-digit limits: one ConfigError too
    allowed = option_names() + [LOSS_KEY, BITS_KEY]
    for key in doc:
        if key not in allowed:
            raise ConfigError(f"{source}: unknown key {key!r}{suggest(key, allowed)}",
                              f"top-level keys: {LOSS_KEY} (a [[loss]] list), {BITS_KEY} (a [[bits]] list) and the "
                              f"distill options {', '.join(option_names())}")
    for key, value in doc.items():
        if key not in (LOSS_KEY, BITS_KEY):
            op.check(key, value, f"{source}: {key}")
    _layer_bits(doc, source)
    terms = doc.get(LOSS_KEY, [])
    if not isinstance(terms, list) or not all(isinstance(t, dict) for t in terms):
        raise ConfigError(f"{source}: 'loss' must be a list of tables ([[loss]] sections)")
    if len(terms) > op.MAX_LOSS_TERMS:
        raise ConfigError(f"{source}: too many [[loss]] terms ({len(terms)}; at most {op.MAX_LOSS_TERMS})",
                          "combine terms of the same method into one with a larger weight")
    options = {k: v for k, v in doc.items() if k != LOSS_KEY}
    return options, terms


def _layer_bits(doc: dict, source: str) -> None:
    """Check ``[[bits]]`` tables (or ``layer_bits`` strings) in place; ``[[bits]]`` becomes ``layer_bits``."""
    from .layerbits import rules_from

    where = f"{source}: layer_bits"
    if BITS_KEY in doc:
        tables, where = doc.pop(BITS_KEY), f"{source}: {BITS_KEY}"
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise ConfigError(f"{source}: 'bits' must be a list of tables ([[bits]] sections) with layers or type, "
                              "and weight and/or act", "for the whole model's bits use weight_bits and act_bits")
        if doc.get("layer_bits"):
            raise ConfigError(f"{source}: both [[bits]] tables and layer_bits give per-layer bits",
                              "keep one of them")
        doc["layer_bits"] = tables
    if doc.get("layer_bits"):
        rules_from(doc["layer_bits"], where)


def read(path: str | Path) -> str:
    """The text of a recipe file (UTF-8), or one error naming what is wrong with the path."""
    from ..core import inputfile

    if str(path) == "":
        raise MissingFileError("--config must not be empty", "pass a .toml file to --config")
    path, found = Path(path), inputfile.kind(path)
    if found == inputfile.DIRECTORY:
        raise MissingFileError(f"recipe {path} is a directory", "pass a .toml file to --config")
    if found == inputfile.MISSING:
        raise MissingFileError(f"recipe not found: {path}", "pass a .toml file to --config")
    if found != inputfile.FILE:  # a FIFO would block the read, /dev/zero never end
        raise MissingFileError(f"recipe {path} is {found}, not a regular file", "pass a .toml file to --config")
    if path.stat().st_size > MAX_BYTES:
        raise ConfigError(f"recipe {path} is {path.stat().st_size} bytes, more than a recipe holds "
                          f"(at most {MAX_BYTES})", "pass the recipe's .toml file to --config")
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
