"""Registry of adaptation methods by name (``tta.list_methods()``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from tta.errors import ConfigError

if TYPE_CHECKING:
    from tta.methods.base import AdaptedModel

_METHODS: dict[str, type[AdaptedModel]] = {}
M = TypeVar("M", bound="type[AdaptedModel]")


def register(name: str) -> Callable[[M], M]:
    """Class decorator registering an ``AdaptedModel`` subclass under ``name``."""

    def wrap(cls: M) -> M:
        if name in _METHODS:
            raise RuntimeError(f"method {name!r} is registered twice ({_METHODS[name].__name__} and {cls.__name__})")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def _load_builtin_methods() -> None:
    # Importing the package registers every built-in method; deferred so that importing tta stays cheap.
    import tta.methods  # noqa: F401


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtin_methods()
    return sorted(_METHODS)


def get_method(name: str) -> type[AdaptedModel]:
    """The class registered under ``name``; a ``ConfigError`` naming the valid choices otherwise."""
    _load_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(_METHODS))}"
        ) from None
