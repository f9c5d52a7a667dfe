"""TOML text -> a dict, or one ConfigError: what ``tomllib`` raises besides TOMLDecodeError included.

``tomllib`` parses nested arrays and inline tables recursively (10,000 ``[`` raise RecursionError) and
converts integers with ``int()`` (more than 4300 digits raise Python's int-str limit ValueError). Every
TOML file and value edgekd reads (recipes, targets, profiles, ``--param`` values) goes through here, so
each of those is one ``error:`` line naming the file. Must not import torch (catalog loading uses it).
"""

from __future__ import annotations

import sys

from ..core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DecodeError = tomllib.TOMLDecodeError


def limit_error(error: BaseException, source: str) -> ConfigError | None:
    """The ConfigError for a TOML text that hits a parser limit (nesting, integer digits), else None."""
    if isinstance(error, RecursionError):
        return ConfigError(f"{source}: arrays or tables are nested too deeply to read",
                           "flatten the nesting (edgekd's settings nest a few levels at most)")
    if isinstance(error, (ValueError, OverflowError)) and not isinstance(error, (DecodeError, UnicodeError)):
        digits = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300
        what = (f"an integer has more than {digits} digits" if "integer string conversion" in str(error)
                else f"a number is too large to read ({type(error).__name__})")
        return ConfigError(f"{source}: {what}", "use a number of sensible size")
    return None


def loads(text: str, source: str) -> dict:
    """The TOML document ``text`` (``source`` names it in errors). A leading byte-order mark (what
    Notepad writes at the start of a UTF-8 file) is dropped: TOML itself refuses it at line 1."""
    try:
        return tomllib.loads(text.removeprefix("\ufeff"))
    except DecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}") from None
    except (RecursionError, ValueError, OverflowError) as e:
        raise limit_error(e, source) from None


def value(text: str, source: str):
    """One TOML value (``8``, ``0.5``, ``"5"``, ``["5", "8"]``); DecodeError when ``text`` is not one,
    also when it holds more than one (``4\nalpha = 0.5`` would otherwise set 4 and drop the rest)."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except DecodeError:
        raise
    except (RecursionError, ValueError, OverflowError) as e:
        raise limit_error(e, source) from None
    if list(doc) != ["v"]:
        raise DecodeError("more than one value", f"v = {text}", 0)
    return doc["v"]
