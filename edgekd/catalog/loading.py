"""Finding and loading catalog entries: names, aliases, profiles' preferred targets, paths.

One file per entry under targets/ and profiles/ (shipped inside the wheel, or the repo folders in a
checkout); the file stem is the name. ``load_target`` accepts a target name, a target alias, a
profile name or alias (meaning that profile's preferred target, so ``--target rpi5`` works) or a
path to a .toml file. This module must not import torch (bench runs on devices without it).
"""

from __future__ import annotations

import dataclasses
import sys
from functools import lru_cache
from pathlib import Path

from ..core.errors import ConfigError, MissingFileError, UnknownNameError
from ..core.registry import suggest
from .schema import (Profile, Target, _build, _check_bench, _check_budgets, _check_clocks, _check_hardware,
                     _check_keys, _subtable, _TYPES, BenchSettings, Budgets, Clocks, parse_target)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def data_dir(kind: str) -> Path:
    """Where the shipped catalog lives: inside the wheel, or the repo folder in a checkout."""
    packaged = Path(__file__).parent.parent / "_data" / kind
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / kind


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise MissingFileError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise MissingFileError(f"not a file: {path}", "pass a catalog name or a .toml file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})", "fix the syntax of the file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start})", "save the file as UTF-8") from None
    except (RecursionError, ValueError, OverflowError) as e:  # tomllib's limits: nesting, integer digits
        from ..config.tomlfile import limit_error

        raise limit_error(e, str(path)) from None


def _profile_target(entry: str, base: Path, where: str) -> str:
    """A profile's target entry -> canonical target name, or an absolute .toml path."""
    if _is_path(entry):
        path = (base / entry).resolve()
        if not path.is_file():
            raise MissingFileError(f"{where}: target file not found: {entry}")
        return str(path)
    index = _target_index()
    if entry in index:
        return index[entry]
    raise ConfigError(f"{where}: targets lists unknown target {entry!r}{suggest(entry, list(index))}",
                      f"choose from: {', '.join(target_names())}")


def parse_profile(table: dict, name: str, where: str) -> Profile:
    table = dict(table)
    bench = _build(BenchSettings, _subtable(table, "bench", where), where + " [bench]")
    budgets = _build(Budgets, _subtable(table, "budgets", where), where + " [budgets]")
    clocks = _build(Clocks, _subtable(table, "clocks", where), where + " [clocks]")
    _check_keys(table, _TYPES[Profile], where)
    if "targets" not in table:
        raise ConfigError(f"{where}: missing required key 'targets'", "list the targets this device runs, preferred first")
    profile = _build(Profile, table, where, name=name, path=where, bench=bench, budgets=budgets, clocks=clocks)
    _check_hardware(profile.hardware, where)
    _check_bench(bench, where + " [bench]")
    _check_budgets(budgets, where + " [budgets]")
    _check_clocks(clocks, where + " [clocks]")
    if not profile.targets:
        raise ConfigError(f"{where}: targets must name at least one target")
    base = Path(where).parent
    targets = tuple(_profile_target(t, base, where) for t in profile.targets)
    return dataclasses.replace(profile, targets=targets)

# --- name resolution -------------------------------------------------------------------------------


def _is_path(name: str) -> bool:
    return name.endswith(".toml") or "/" in name or "\\" in name


def _entries(kind: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted(data_dir(kind).glob("*.toml"))}


def _index(kind: str) -> dict[str, str]:
    """name-or-alias -> canonical name for one catalog folder (cached until a file changes)."""
    files = tuple((str(p), p.stat().st_mtime_ns) for p in sorted(data_dir(kind).glob("*.toml")))
    return _build_index(kind, files)


@lru_cache(maxsize=16)
def _build_index(kind: str, files: tuple) -> dict[str, str]:
    paths = [Path(f) for f, _ in files]
    index = {p.stem: p.stem for p in paths}
    for path in paths:
        aliases = _read_toml(path).get("aliases", [])
        for alias in aliases if isinstance(aliases, list) else []:
            if alias in index and index[alias] != path.stem:
                raise ConfigError(f"{path}: alias {alias!r} is already used by {kind[:-1]} {index[alias]!r}",
                                  "aliases must be unique across the catalog")
            index[alias] = path.stem
    return index


def _target_index() -> dict[str, str]:
    return _index("targets")


def _profile_index() -> dict[str, str]:
    return _index("profiles")


def resolve_target(name_or_path: str) -> tuple[str, Path, str]:
    """-> (target name, its file, how it was found: 'name' | 'alias' | 'profile:NAME' | 'path')."""
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise MissingFileError(f"target file not found: {path}", "pass a catalog name or an existing .toml path")
        return path.stem, path, "path"
    targets, profiles = _target_index(), _profile_index()
    if name_or_path in targets:
        name = targets[name_or_path]
        return name, _entries("targets")[name], "name" if name == name_or_path else "alias"
    if name_or_path in profiles:
        profile = load_profile(profiles[name_or_path])
        name, path, _ = resolve_target(profile.targets[0])
        return name, path, f"profile:{profile.name}"
    raise UnknownNameError(
        f"unknown target {name_or_path!r}{suggest(name_or_path, list(targets) + list(profiles))}",
        f"choose one of: {', '.join(target_names())} (or a profile name, or a path to a .toml file)")


def resolve_profile(name_or_path: str) -> tuple[str, Path]:
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise MissingFileError(f"profile file not found: {path}", "pass a catalog name or an existing .toml path")
        return path.stem, path
    profiles = _profile_index()
    if name_or_path in profiles:
        name = profiles[name_or_path]
        return name, _entries("profiles")[name]
    raise UnknownNameError(f"unknown profile {name_or_path!r}{suggest(name_or_path, list(profiles))}",
                           f"choose one of: {', '.join(profile_names())} (or a path to a .toml file)")


def load_target(name_or_path: str) -> Target:
    name, path, _ = resolve_target(name_or_path)
    return parse_target(_read_toml(path), name, str(path))


def load_profile(name_or_path: str) -> Profile:
    name, path = resolve_profile(name_or_path)
    return parse_profile(_read_toml(path), name, str(path))


def target_names() -> list[str]:
    return list(_entries("targets"))


def profile_names() -> list[str]:
    return list(_entries("profiles"))


def as_dict(obj) -> dict:
    """A JSON-ready view of a Target or Profile (tuples become lists)."""
    return _jsonable(dataclasses.asdict(obj))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def list_targets() -> list[Target]:
    return [load_target(n) for n in target_names()]


def list_profiles() -> list[Profile]:
    return [load_profile(n) for n in profile_names()]

