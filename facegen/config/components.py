"""Component families whose kinds are modules: each module declares its settings and builds itself.

A family (cleaning experts, embedder kinds, ...) is a :class:`ComponentTable`: ``kind -> module``.
The module of a kind defines ``build(settings, **context)``, which returns the working component, and
``SETTINGS``, a subclass of the family's settings base whose ``kind`` field is ``Literal["<kind>"]``
(a kind that adds no settings may leave it out: the base is used). Whatever else a family asks of a
kind (a check, a capability) is a module attribute read with :meth:`ComponentTable.hook`.
Adding a kind is its module plus one line in the table (or one :meth:`ComponentTable.register`
call). A capability the settings must know before any module is imported (a generator backend with a
latent space) is a trait named on that same line: ``"dcgan": ("facegen.generators.dcgan",
"latent_space")``. The settings layer reaches a component module only here, by name, when a config
names its kind or defaults to it (a kind's module imports its heavy libraries only when it builds).
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

    def __init__(self, field: str, base: type[ComponentSettings], modules: dict[str, str | tuple[str, ...]]):
        self.field, self.base = field, base
        self._modules: dict[str, str] = {}
        self._traits: dict[str, frozenset[str]] = {}
        for kind, spec in modules.items():
            module, *traits = (spec,) if isinstance(spec, str) else spec
            self.register(kind, module, *traits)

    def register(self, kind: str, module: str, *traits: str) -> None:
        """Add ``kind``, implemented by the importable ``module`` (a dotted name), with ``traits``."""
        if kind in self._modules and self._modules[kind] != module:
            raise ValueError(f"{self.field}: kind {kind!r} is already implemented by {self._modules[kind]}")
        self._modules[kind] = module
        self._traits[kind] = frozenset(traits)

    def with_trait(self, trait: str) -> tuple[str, ...]:
        """The kinds registered with ``trait`` (imports nothing)."""
        return tuple(k for k in self.kinds if trait in self._traits[k])

    @property
    def kinds(self) -> tuple[str, ...]:
        """The registered kinds, in registration order."""
        return tuple(self._modules)

    def module(self, kind: str) -> ModuleType:
        """The module of ``kind``, imported now and checked to declare ``build`` (and a fitting ``SETTINGS``)."""
        if kind not in self._modules:
            raise ValueError(f"unknown kind {kind!r}, expected one of {', '.join(self.kinds)}")
        module = importlib.import_module(self._modules[kind])
        settings = getattr(module, "SETTINGS", self.base)
        if not (isinstance(settings, type) and issubclass(settings, self.base)) or not callable(getattr(module, "build", None)):
            raise TypeError(f"{module.__name__} implements {self.field} kind {kind!r} but lacks build() or its "
                            f"SETTINGS is not a {self.base.__name__}")
        if settings is not self.base and settings.model_fields["kind"].default != kind:
            raise TypeError(f"{module.__name__}.SETTINGS.kind defaults to {settings.model_fields['kind'].default!r}, "
                            f"not its registered kind {kind!r}")
        return module

    def settings(self, value: Any) -> ComponentSettings:
        """``value`` (a mapping with ``kind``, or settings already built) as its kind's settings."""
        if isinstance(value, self.base):
            return value
        if not isinstance(value, dict) or "kind" not in value:
            raise ValueError(f"expected a mapping with a kind (one of {', '.join(self.kinds)})")
        settings_class = getattr(self.module(str(value["kind"])), "SETTINGS", self.base)
        try:
            return settings_class.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"not a setting of {self.field} kind {value['kind']}"
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where}: {message}" if where else message) from None

    def check(self, settings: Any, noun: str, also: str = "") -> None:
        """That ``settings.kind`` is registered (``kind: unknown <noun> kind ...``, listing ``also``
        after the kinds), then its module's ``check(settings)`` where it has one."""
        if settings.kind not in self._modules:
            raise ValueError(f"kind: unknown {noun} kind {settings.kind!r}, expected one of {', '.join(self.kinds)}{also}")
        check = self.hook(settings.kind, "check")
        if check is not None:
            check(settings)

    def hook(self, kind: str, name: str) -> Any:
        """Attribute ``name`` of ``kind``'s module (a check, a capability), or None where it has none."""
        return getattr(self.module(kind), name, None)

    def having(self, name: str) -> tuple[str, ...]:
        """The kinds whose module has attribute ``name`` (imports every kind's module)."""
        return tuple(k for k in self.kinds if self.hook(k, name) is not None)

    def build(self, settings: ComponentSettings, **context: Any) -> Any:
        """The component of ``settings`` (its module's ``build(settings, **context)``)."""
        return self.module(settings.kind).build(settings, **context)
