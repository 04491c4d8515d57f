"""Registries by name. This module imports none of its clients: ``tta.methods`` imports every built-in method
module (which registers itself here) and looks methods up through ``tta.methods.get_method``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from tta.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (e.g. adaptation methods); registering a name twice is a bug."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering its argument under ``name`` (and setting its ``name`` attribute)."""

        def wrap(entry: T) -> T:
            if name in self._entries:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            entry.name = name  # type: ignore[attr-defined]
            self._entries[name] = entry
            return entry

        return wrap

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The entry registered under ``name``; a ``ConfigError`` naming the valid choices otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None


METHODS: Registry = Registry("method")
register = METHODS.register
