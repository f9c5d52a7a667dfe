"""Name -> object registries with did-you-mean on unknown names."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


def suggest(name: str, choices: list[str] | tuple[str, ...], n: int = 3) -> str:
    """Return a ' (did you mean ...?)' fragment, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def unknown(kind: str, name: str, choices) -> UnknownNameError:
    choices = sorted(choices)
    shown = repr(name) if len(repr(name)) <= 100 else repr(name)[:96] + "...'"  # a 100 kB name: one short line
    return UnknownNameError(
        f"unknown {kind} {shown}{suggest(str(name)[:100], choices)}",
        f"choose one of: {', '.join(choices)}" if choices else None,
    )


class Registry(Generic[T]):
    """A small ordered mapping from names to objects, filled by a decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: a list or table read from a file, not a name
            raise unknown(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
