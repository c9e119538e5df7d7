"""The value types of the site file: each checks its TOML type and says what it expects in the file's words.

:func:`site_trait` copies one of them for another configurable; the copy also runs the rule of the site
setting it mirrors.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn

from traitlets import Bool, Enum, Float, Int, TraitError, TraitType, Undefined, Unicode

from paitient.config.errors import SettingError, must

if TYPE_CHECKING:
    from paitient.config.model import Model


@dataclass(frozen=True)
class Rule:
    """What a setting's value must satisfy, in the words of the error: ``must {text}, got {value}``."""

    text: str
    ok: Callable[[Any], bool]

    def check(self, value: Any) -> None:
        must(self.ok(value), self.text, value)


POSITIVE = Rule("be a positive whole number", lambda v: v > 0)
NOT_NEGATIVE = Rule("be 0 or a positive whole number", lambda v: v >= 0)
SHARE = Rule("lie in (0, 1]", lambda v: 0 < v <= 1)

SHARED_ACCOUNTS = frozenset(
    {"root", "nobody", "nogroup", "daemon", "bin", "sys", "sync", "www-data", "jupyterhub", "paitient"}
)
"""Accounts shared with other software or privileged: a worker running untrusted computations never runs as
one (a compromised computation would reach everything else that runs as it)."""

WORKER_ACCOUNT = Rule(
    "name a dedicated account (1-32 lower-case letters, digits or '-', starting with a letter), not one shared "
    "with other software such as nobody or root; paitient makes it on first use",
    lambda v: re.match(r"^[a-z][a-z0-9-]{0,31}\Z", v) is not None and v not in SHARED_ACCOUNTS,
)
ABSOLUTE = Rule("be an absolute path", lambda v: v.startswith("/"))


def at_least(low: int) -> Rule:
    return Rule(f"be at least {low}", lambda v: v >= low)


class SiteTrait(TraitType[Any, Any]):
    """A trait of the site model: a clear error in the file's terms, its :class:`Rule`, and the rule of a
    mirrored setting.

    Each type below puts it before a traitlets type (``class WholeNumber(SiteTrait, Int)``), so its
    :meth:`error` and :meth:`validate` come first."""

    expects = "a value"
    mirrors: tuple[type[Model], str] | None = None
    rule: Rule | None = None

    def __init__(self, *args: Any, rule: Rule | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("config", True)  # every setting of the site model is read from the site file
        super().__init__(*args, **kwargs)
        self.rule = rule

    def error(self, obj: Any, value: Any, error: Exception | None = None, info: str | None = None) -> NoReturn:
        raise TraitError(f"expected {self.expects}, got {value!r}")

    def validate(self, obj: Any, value: Any) -> Any:
        value = self.check_type(obj, value)
        if self.rule is not None and self.mirrors is None:  # a mirror runs it with the setting's other rules
            self.rule.check(value)
        if self.mirrors is not None:
            section, name = self.mirrors
            value = section.apply_rule(name, value)
        return value

    def check_type(self, obj: Any, value: Any) -> Any:
        raise NotImplementedError


class WholeNumber(SiteTrait, Int):
    expects = "a whole number"

    def check_type(self, obj: Any, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(obj, value)
        return int(value)


class Number(SiteTrait, Float):
    expects = "a number"

    def check_type(self, obj: Any, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(obj, value)
        return float(value)


class Text(SiteTrait, Unicode):
    expects = "a string"

    def check_type(self, obj: Any, value: Any) -> str:
        if not isinstance(value, str):
            self.error(obj, value)
        return value


class Flag(SiteTrait, Bool):
    expects = "true or false"

    def check_type(self, obj: Any, value: Any) -> bool:
        if not isinstance(value, bool):
            self.error(obj, value)
        return value


class Choice(SiteTrait, Enum):
    """One of a few strings."""

    def __init__(self, values: tuple[str, ...], default_value: str, **kwargs: Any) -> None:
        super().__init__(values, default_value, **kwargs)
        self.choices = values
        self.expects = "one of " + ", ".join(repr(v) for v in values)

    def check_type(self, obj: Any, value: Any) -> str:
        if value not in self.choices:
            self.error(obj, value)
        return value


class Names(SiteTrait, TraitType):
    """A list of strings, kept as a tuple; a single string stands for a list of one."""

    expects = "a list of strings"

    def __init__(self, default_value: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(tuple(default_value), **kwargs)

    def check_type(self, obj: Any, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            self.error(obj, value)
        return tuple(value)


class OfModel(SiteTrait, TraitType):
    """A trait whose values are made by a model class (``klass``) from tables of the site file."""

    empty: Any = Undefined
    """The default value (made by :meth:`make_dynamic_default` where Undefined)."""

    def __init__(self, klass: type[Model], **kwargs: Any) -> None:
        self.klass = klass
        super().__init__(self.empty, **kwargs)

    def made(self, item: Any) -> Model:
        """``item`` as a model object: as it is when it is one, else made from its table."""
        return item if isinstance(item, self.klass) else self.klass(**_table(item))


class Part(OfModel):
    """A table that is a model object of its own (a section, a project's budget)."""

    expects = "a table"

    def make_dynamic_default(self) -> Model:
        return self.klass()

    def check_type(self, obj: Any, value: Any) -> Model:
        if not isinstance(value, self.klass | Mapping):
            self.error(obj, value)
        return self.made(value)


class PartsByName(OfModel):
    """A table of name = table, each a model object (a project's per-dataset budgets); read-only."""

    expects = "a table of name = table"
    empty = MappingProxyType({})

    def check_type(self, obj: Any, value: Any) -> Mapping[str, Model]:
        if not isinstance(value, Mapping):
            self.error(obj, value)
        out = {}
        for name, item in value.items():
            try:
                out[name] = self.made(item)
            except SettingError as e:
                raise e.under(name) from None
        return MappingProxyType(out)


class Parts(OfModel):
    """An array of tables (``[[projects]]``), each a model object, kept as a tuple.

    An error inside one is reported under its ``name`` when it has one, else under its index."""

    expects = "an array of tables"
    empty = ()

    def check_type(self, obj: Any, value: Any) -> tuple[Model, ...]:
        if not isinstance(value, list | tuple):
            self.error(obj, value)
        out = []
        for index, item in enumerate(value):
            try:
                out.append(self.made(item))
            except SettingError as e:
                name = item.get("name") if isinstance(item, Mapping) else None
                raise e.under(name if isinstance(name, str) and name else str(index)) from None
        return tuple(out)


class Overrides(OfModel):
    """Some keys of another section, each checked by that section's rules (a project's ``egress``)."""

    expects = "a table"
    empty = MappingProxyType({})

    def check_type(self, obj: Any, value: Any) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.error(obj, value)
        checked = self.klass(**value)
        return MappingProxyType({key: getattr(checked, key) for key in value})


def _table(item: Any) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise SettingError((), None, f"must be a table, got {item!r}")
    return item


def site_trait(section: type[Model], name: str) -> SiteTrait:
    """A trait for another configurable that mirrors the site setting ``[section] name``.

    It has the setting's type, default, help text and rule, so the two cannot disagree; its help names
    the site setting the value comes from. Use it as a class attribute::

        output_cap_message_bytes = site_trait(Server, "output_cap_message_bytes")
    """
    source = section.settings()[name]
    if not isinstance(source, SiteTrait):
        # only the site types run a mirrored setting's rule: a mirror of another trait would skip it
        raise TypeError(
            f"[{section.section}] {name} has the type {type(source).__name__}, whose mirror would not run the "
            "setting's rule; declare it with a type from paitient.config.traits"
        )
    trait = copy.copy(source)
    trait.metadata = {**source.metadata, "config": True, "site_setting": f"[{section.section}] {name}"}
    trait.help = f"{source.help} Site setting [{section.section}] {name}."
    trait.mirrors = (section, name)
    return trait
