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

from .errors import ConfigError, MissingFileError
from .registry import suggest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOSS_KEY = "loss"


def option_names() -> list[str]:
    from .options import DistillOptions

    return [f.name for f in fields(DistillOptions) if f.name not in ("progress", "config", "loss")]


def parse(text: str, source: str = "recipe") -> tuple[dict, list[dict]]:
    """(options, loss term specs) of a recipe's text; every key and term is validated."""
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
            _check_option(key, value, source)
    terms = doc.get(LOSS_KEY, [])
    if not isinstance(terms, list) or not all(isinstance(t, dict) for t in terms):
        raise ConfigError(f"{source}: 'loss' must be a list of tables ([[loss]] sections)")
    for i, term in enumerate(terms):
        _check_term(term, f"{source}: [[loss]] #{i + 1}")
    options = {k: v for k, v in doc.items() if k != LOSS_KEY}
    return options, terms


# TOML value types of the distill options' annotations, and the bounds the CLI enforces.
_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,)}
_BOUNDS = {"weight_bits": (2, 8), "act_bits": (2, 8), "epochs": (1, None),
           "float_epochs": (0, None), "teacher_epochs": (1, None), "batch_size": (1, None), "generations": (1, None),
           "peers": (1, None), "assistant_epochs": (1, None), "train_limit": (1, None)}


def _check_option(key: str, value, source: str) -> None:
    """A top-level option must have its DistillOptions type (a bool is not an int) and CLI bounds."""
    from .options import DistillOptions

    annotation = str({f.name: f.type for f in fields(DistillOptions)}[key])
    kinds = [_KINDS.get(part.strip().split("[")[0]) for part in annotation.split("|")]
    allowed = tuple(t for k in kinds if k for t in k)
    if allowed and ((isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed)):
        names = [part.strip() for part in annotation.split("|") if part.strip() != "None"]
        raise ConfigError(f"{source}: {key} must be {' or '.join(names)}, got {type(value).__name__} {value!r}")
    lo, hi = _BOUNDS.get(key, (None, None))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"{source}: {key} must be {bound}, got {value!r}")


def _check_term(term: dict, where: str) -> None:
    from .losses import LOSSES, Objective, term_params

    if "name" not in term:
        raise ConfigError(f"{where} has no 'name'", f"methods: {', '.join(LOSSES.names())}")
    cls = LOSSES.get(term["name"])
    allowed = ["name", "weight", *term_params(cls)]
    for key in term:
        if key not in allowed:
            raise ConfigError(f"{where} ({term['name']}): unknown key {key!r}{suggest(key, allowed)}",
                              f"its keys: {', '.join(allowed)}")
    Objective.from_specs([term])  # values are checked by the term itself


def load(path: str | Path) -> tuple[dict, list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"recipe not found: {path}", "pass a .toml file to --config")
    return parse(path.read_text(), str(path))


def apply(opts, options: dict, explicit: set[str] | None = None):
    """``opts`` with the recipe's options, except those the user set explicitly (``explicit``)."""
    from dataclasses import replace

    keep = explicit or set()
    return replace(opts, **{k: v for k, v in options.items() if k not in keep})
