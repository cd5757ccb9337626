"""Name -> factory registries. Configuration strings resolve only through these.

A registry refuses a second registration under the same name and answers an unknown
name with an error that lists every known one (no ``import_module`` of user text).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import RegistryError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A named set of factories, e.g. ``BACKBONES.get("swin-tiny")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register ``fn`` under ``name``; a duplicate name is refused."""

        def deco(fn: F) -> F:
            if name in self._items:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
