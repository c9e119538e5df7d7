"""The settings model: :class:`Model`, the base of every table of the site file.

A model class declares its settings as traits of the types in :mod:`paitient.config.traits` (default,
help, and a :class:`~paitient.config.traits.Rule` for a value's range); a rule that needs more than the
value (a parse, a message of its own) is a ``@validate`` method next to the setting, and :meth:`Model.check`
holds the few rules that span several settings. A model object is built from keyword arguments (a TOML
table), validated key by key, and frozen: setting a public attribute afterwards raises
:class:`dataclasses.FrozenInstanceError`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any, ClassVar

from traitlets import Bunch, TraitError, TraitType, ValidateHandler
from traitlets.config import Configurable

from paitient.config.errors import SettingError


@functools.cache
def _settings(cls: type[Model]) -> dict[str, TraitType]:
    out: dict[str, TraitType] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, TraitType) and value.metadata.get("config"):
                out[name] = value
    return out


@functools.cache
def _rules(cls: type[Model]) -> dict[str, ValidateHandler]:
    out: dict[str, ValidateHandler] = {}
    for klass in reversed(cls.__mro__):
        for value in vars(klass).values():
            if isinstance(value, ValidateHandler):
                for name in value.trait_names:
                    if isinstance(name, str):  # Model refuses @validate(All) when the class is made
                        out[name] = value
    return out


class Model(Configurable):
    """A frozen, validated group of settings: one TOML table of the site file."""

    section: ClassVar[str] = ""
    """The table's name in the site file (``workspace`` for ``[workspace]``)."""
    unknown_key: ClassVar[str] = "unknown key {key!r}; known keys: {known}"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        named: dict[str, str] = {}
        for attr, value in vars(cls).items():
            if isinstance(value, ValidateHandler):
                for name in value.trait_names:
                    # traitlets registers @validate(All) under the sentinel and never calls it for any trait
                    if not isinstance(name, str):
                        raise TypeError(f"{cls.__name__}.{attr} is @validate(All), which never runs; name the settings")
                    # traitlets keeps one validator per trait: a second one would silently replace the first
                    if name in named:
                        raise TypeError(f"{cls.__name__}.{name} is checked by both {named[name]} and {attr}")
                    named[name] = attr

    def __init__(self, *args: Any, **values: Any) -> None:
        super().__init__()
        settings = self.settings()
        if len(args) > len(settings):
            raise TypeError(f"{type(self).__name__} takes at most {len(settings)} positional arguments")
        for name, value in zip(settings, args, strict=False):
            if name in values:
                raise TypeError(f"{type(self).__name__} got {name!r} twice")
            values[name] = value
        for key, value in values.items():
            if key not in settings:
                raise SettingError((), None, self.unknown_key.format(key=key, known=", ".join(sorted(settings))))
            try:
                setattr(self, key, value)
            except TraitError as e:
                raise SettingError((), key, str(e)) from None
            except SettingError as e:
                raise e.under(key) from None
        for key in settings:
            getattr(self, key)  # defaults are made now, while the object may still change
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_") and self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(
                f"{type(self).__name__}.{name}: the site configuration cannot change after it is loaded; "
                "use .replace(...) for a changed, validated copy"
            )
        super().__setattr__(name, value)

    def set_trait(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(f"{type(self).__name__}.{name}: the site configuration is frozen")
        super().set_trait(name, value)

    # ------------------------------------------------------------------ reading

    @classmethod
    def settings(cls) -> dict[str, TraitType]:
        """The settings of this table in declaration order: name -> trait."""
        return _settings(cls)

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.settings()}

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain data (tables as dicts, lists as lists), for JSON and TOML."""
        return {name: plain(value) for name, value in self.values().items()}

    def check(self) -> None:
        """Rules that span several settings of this table; raise :class:`SettingError`."""

    def check_all(self) -> None:
        """:meth:`check` of every table inside this one, then of this one."""
        for name, value in self.values().items():
            for label, part in _parts(value):
                try:
                    part.check_all()
                except SettingError as e:
                    raise (e.under(label) if label else e).under(name) from None
        self.check()

    def replace(self, **changes: Any) -> Any:
        """A validated copy with ``changes`` (``site.workspace.replace(min_k=4)``)."""
        copy_ = type(self)(**{**self.values(), **changes})
        copy_.check_all()
        return copy_

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.to_dict() == other.to_dict()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, json.dumps(self.to_dict(), sort_keys=True, default=str)))

    def __copy__(self) -> Model:
        return self  # immutable: a copy is the object itself (traitlets deep-copies config values)

    def __deepcopy__(self, memo: dict[int, Any]) -> Model:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_remake, (type(self), self.to_dict()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.values().items())
        return f"{type(self).__name__}({inner})"

    # ------------------------------------------------------------------ rules of one setting

    @classmethod
    def apply_rule(cls, name: str, value: Any) -> Any:
        """Run the rules of setting ``name`` on ``value``: its type's :class:`~paitient.config.traits.Rule`
        and its ``@validate`` method (for traits that mirror it)."""
        rule = getattr(cls.settings()[name], "rule", None)
        if rule is not None:
            rule.check(value)
        handler = _rules(cls).get(name)
        if handler is None:
            return value
        owner = _prototype(cls)
        return handler.func(owner, Bunch(trait=cls.settings()[name], value=value, owner=owner))


def _remake(cls: type[Model], values: dict[str, Any]) -> Model:
    return cls(**values)


@functools.cache
def _prototype(cls: type[Model]) -> Model:
    return cls()


def _parts(value: Any) -> list[tuple[str | None, Model]]:
    """The model objects inside a setting's value, each with its label (its name or index)."""
    if isinstance(value, Model):
        return [(None, value)]
    if isinstance(value, Mapping):
        return [(k, v) for k, v in value.items() if isinstance(v, Model)]
    if isinstance(value, tuple):
        return [(getattr(v, "name", "") or str(i), v) for i, v in enumerate(value) if isinstance(v, Model)]
    return []


def plain(value: Any) -> Any:
    if isinstance(value, Model):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
