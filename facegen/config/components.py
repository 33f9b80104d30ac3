"""Component families whose kinds are modules: each module declares its settings and builds itself.

A family (cleaning experts, ...) is a :class:`ComponentTable`: ``kind -> module``. The module of a
kind defines ``SETTINGS``, a subclass of the family's settings base whose ``kind`` field is
``Literal["<kind>"]``, and ``build(settings, **context)``, which returns the working component.
Adding a kind is its module plus one line in the table (or one :meth:`ComponentTable.register`
call). The settings layer reaches a component module only here, by name and only when a config
names its kind, so loading a config never imports the components it does not use.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from facegen.config._base import _Section


class ComponentSettings(_Section):
    """What every component's settings share: ``kind`` names the module that implements it."""

    kind: str


class ComponentTable:
    """The kinds of one component family, each implemented by one module (see the module docstring).

    ``field`` is the config field the family's settings are given in (for error messages); ``base``
    the settings class every kind's ``SETTINGS`` subclasses.
    """

    def __init__(self, field: str, base: type[ComponentSettings], modules: dict[str, str]):
        self.field, self.base = field, base
        self._modules = dict(modules)

    def register(self, kind: str, module: str) -> None:
        """Add ``kind``, implemented by the importable ``module`` (a dotted name)."""
        if kind in self._modules and self._modules[kind] != module:
            raise ValueError(f"{self.field}: kind {kind!r} is already implemented by {self._modules[kind]}")
        self._modules[kind] = module

    @property
    def kinds(self) -> tuple[str, ...]:
        """The registered kinds, in registration order."""
        return tuple(self._modules)

    def module(self, kind: str) -> ModuleType:
        """The module of ``kind``, imported now and checked to declare ``SETTINGS`` and ``build``."""
        if kind not in self._modules:
            raise ValueError(f"unknown kind {kind!r}, expected one of {', '.join(self.kinds)}")
        module = importlib.import_module(self._modules[kind])
        settings = getattr(module, "SETTINGS", None)
        if not (isinstance(settings, type) and issubclass(settings, self.base)) or not callable(getattr(module, "build", None)):
            raise TypeError(f"{module.__name__} implements {self.field} kind {kind!r} but lacks SETTINGS "
                            f"(a {self.base.__name__}) or build()")
        if settings.model_fields["kind"].default != kind:
            raise TypeError(f"{module.__name__}.SETTINGS.kind defaults to {settings.model_fields['kind'].default!r}, "
                            f"not its registered kind {kind!r}")
        return module

    def settings(self, value: Any) -> ComponentSettings:
        """``value`` (a mapping with ``kind``, or settings already built) as its kind's settings."""
        if isinstance(value, self.base):
            return value
        if not isinstance(value, dict) or "kind" not in value:
            raise ValueError(f"expected a mapping with a kind (one of {', '.join(self.kinds)})")
        settings_class = self.module(str(value["kind"])).SETTINGS
        try:
            return settings_class.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "<root>"
            raise ValueError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None

    def build(self, settings: ComponentSettings, **context: Any) -> Any:
        """The component of ``settings`` (its module's ``build(settings, **context)``)."""
        return self.module(settings.kind).build(settings, **context)
