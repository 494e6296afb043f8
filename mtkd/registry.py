"""A small name -> object registry (register / get / list)."""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one kind; duplicate names are an error.

    Lookups of unknown names raise ``KeyError`` with a message that lists the
    known names, so a typo on the command line tells the user what exists.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """Register ``obj`` under ``name`` and return it; without ``obj``, a decorator that does so."""
        if obj is None:
            return lambda o: self.register(name, o)
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.list()) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def list(self) -> list[str]:
        """The names, in the order they were registered (the order ``--help`` lists them in)."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._items)
