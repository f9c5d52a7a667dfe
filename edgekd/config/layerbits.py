"""Per-layer bit widths: rules that give some layers other weight / activation bits than the rest.

A rule names layers and bits:

- layers: a layer type keyword (``TYPES``: depthwise, pointwise, conv, linear, first, last) or an
  fnmatch glob on the module path (``features.3.*``, ``3.0``); a glob also matches the layers inside
  the modules it names (``3`` matches ``3.0`` and ``3.4``). Only Conv and Linear layers carry bits.
- bits: ``W`` the layer's weights; ``A`` the activations the layer reads (the quantizer in front of
  it: a layer computes W-bit weights times A-bit inputs). Either may be left out.

Command line: ``--layer-bits PATTERN=WxAy``, repeatable, e.g. ``depthwise=W8A8``, ``'3.*=W4'``,
``last=A8``; several patterns joined by commas (``first,last=W8``). Recipe: ``[[bits]]`` tables
with ``layers`` (globs) or ``type`` (keywords), a string or a list, and ``weight`` / ``act``.

Rules apply in order and a later rule wins for the layers both name (command-line rules come after
a recipe's). The target's first/last-layer bits (``--first-last-bits``) apply before any rule. An
activation quantizer that feeds several layers takes the largest act bits asked for any of them.
A module path that is also a keyword (a layer named ``conv``) is written as a glob: ``[c]onv``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import options as op
from ..core.errors import ConfigError
from ..core.registry import suggest

TYPES = ("depthwise", "pointwise", "conv", "linear", "first", "last")
TABLE_KEYS = ("layers", "type", "weight", "act")
EXAMPLE = "e.g. --layer-bits depthwise=W8A8 or --layer-bits 'features.3.*=W4'"
_BITS = re.compile(r"(?:W([0-9]{1,3}))?(?:A([0-9]{1,3}))?", re.IGNORECASE | re.ASCII)  # ASCII digits only


@dataclass(frozen=True)
class LayerRule:
    """Layers (globs on module paths, or type keywords) and the bits they get (None: unchanged)."""

    layers: tuple[str, ...] = ()
    type: tuple[str, ...] = ()
    weight: int | None = None
    act: int | None = None

    @property
    def pattern(self) -> str:
        return ",".join((*self.type, *self.layers))

    def to_dict(self) -> dict:
        """The rule as a ``[[bits]]`` table (how checkpoints and recipe.json store it)."""
        out = {"layers": list(self.layers), "type": list(self.type), "weight": self.weight, "act": self.act}
        return {k: v for k, v in out.items() if v not in (None, [])}

    @property
    def text(self) -> str:
        """The rule as ``--layer-bits`` takes it: ``depthwise=W8A8``."""
        bits = (f"W{self.weight}" if self.weight else "") + (f"A{self.act}" if self.act else "")
        return f"{self.pattern}={bits}"


def _check_bits(kind: str, value, where: str) -> int:
    return op.check(f"{kind}_bits", value, f"{where}: {kind.replace('act', 'activation')} bits")


def _match_bits(bits: str, where: str) -> re.Match:
    """``WxAy`` -> its match; bits written in other characters than ASCII (``W٨``, ``Ｗ８``: other
    scripts' digits, which Python's int() reads but no recipe or log reader does) are refused."""
    m = _BITS.fullmatch(bits)
    if m and (m.group(1) or m.group(2)):
        return m
    if not bits.isascii():
        raise ConfigError(f"{where}: bits must be written with ASCII letters and digits (W, A, 0-9), got "
                          f"{op.shown(bits, 40)}", "retype them, e.g. depthwise=W8A8")
    raise ConfigError(f"{where}: bits must be W<weight bits>A<activation bits>, W<bits> or A<bits>, got "
                      f"{op.shown(bits, 40)}", EXAMPLE)


def parse_text(text: str, label: str = "--layer-bits") -> LayerRule:
    """``PATTERN=WxAy`` (``--layer-bits``) -> a LayerRule; one ConfigError naming what is wrong (a
    long pattern is cut in the message)."""
    where = f"{label} {op.shown(text)}"
    pattern, sep, bits = str(text).rpartition("=")
    if not sep or not pattern.strip():
        raise ConfigError(f"{where}: expected PATTERN=WxAy (a layer type or a module-path glob, then bits)", EXAMPLE)
    m = _match_bits(bits.strip(), where)
    parts = [p.strip() for p in pattern.split(",")]
    if not all(parts):
        raise ConfigError(f"{where}: empty pattern between commas", EXAMPLE)
    weight = _check_bits("weight", int(m.group(1)), where) if m.group(1) else None
    act = _check_bits("act", int(m.group(2)), where) if m.group(2) else None
    return LayerRule(layers=tuple(p for p in parts if p not in TYPES), type=tuple(p for p in parts if p in TYPES),
                     weight=weight, act=act)


def _strings(value, key: str, where: str) -> tuple[str, ...]:
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise ConfigError(f"{where}: {key} must be a non-empty string or a list of them, got {op.shown(value)}")
    return tuple(v.strip() for v in items)


def parse_table(table: dict, where: str = "[[bits]]") -> LayerRule:
    """A ``[[bits]]`` table (or a checkpoint's rule) -> a LayerRule; unknown keys, a missing or
    doubled selector, unknown types and bits out of range are one ConfigError each."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table with layers or type, and weight and/or act, got {op.shown(table)}")
    for key in table:
        if key not in TABLE_KEYS:
            raise ConfigError(f"{where}: unknown key {op.shown(key, 40)}{suggest(str(key)[:100], TABLE_KEYS)}",
                              f"keys: {', '.join(TABLE_KEYS)}")
    layers, types = _strings(table.get("layers"), "layers", where), _strings(table.get("type"), "type", where)
    if bool(layers) == bool(types):
        raise ConfigError(f"{where}: give either layers (module-path globs) or type ({', '.join(TYPES)})",
                          'e.g. type = "depthwise" or layers = "features.3.*"')
    for t in types:
        if t not in TYPES:
            raise ConfigError(f"{where}: unknown layer type {op.shown(t, 40)}{suggest(t[:100], TYPES)}",
                              f"types: {', '.join(TYPES)}")
    weight, act = table.get("weight"), table.get("act")
    if weight is None and act is None:
        raise ConfigError(f"{where}: give weight and/or act bits", "e.g. weight = 8")
    return LayerRule(layers=layers, type=types, weight=None if weight is None else _check_bits("weight", weight, where),
                     act=None if act is None else _check_bits("act", act, where))


def rules_from(value, where: str = "--layer-bits") -> tuple[LayerRule, ...]:
    """Rules from ``--layer-bits`` strings, ``[[bits]]`` tables or LayerRules (in order)."""
    if value is None:
        return ()
    if isinstance(value, (str, dict, LayerRule)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list of PATTERN=WxAy strings or [[bits]] tables, got {op.shown(value)}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, LayerRule):
            out.append(item)
        elif isinstance(item, str):
            out.append(parse_text(item, where))
        else:
            out.append(parse_table(item, f"{where}[{i}]"))
    return tuple(out)


def escape(path: str) -> str:
    """A module path as a glob naming that path only: glob characters bracketed (``[*]``), a comma
    (which ``--layer-bits`` splits on) as ``?``, and a path that is a type keyword as ``[c]onv``."""
    out = "".join(f"[{c}]" if c in "[*?" else "?" if c == "," else c for c in path)
    return f"[{out[0]}]{out[1:]}" if out in TYPES else out


def capped(rules: tuple[LayerRule, ...], max_weight: int) -> tuple[LayerRule, ...]:
    """``rules`` with weight bits above ``max_weight`` lowered to it (a reduce_range target)."""
    from dataclasses import replace

    return tuple(replace(r, weight=min(r.weight, max_weight)) if r.weight else r for r in rules)
