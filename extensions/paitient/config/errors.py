"""Errors of the site configuration, and :func:`must`, the one-line form of a setting's rule."""

from __future__ import annotations

from typing import Any

from traitlets import TraitError


class ConfigError(ValueError):
    """The site configuration is invalid; the message names the file, the key and what to change."""


class SettingError(ConfigError):
    """One setting of a model object is wrong.

    ``table`` is the path of the table that holds it, relative to the object the error left (``()`` for the
    object itself, ``("budget",)`` for a project's budget); ``key`` is ``None`` for the table as a whole.
    """

    def __init__(self, table: tuple[str, ...], key: str | None, message: str) -> None:
        self.table, self.key, self.message = table, key, message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, name: str) -> SettingError:
        """The same error seen from the object that holds this one under ``name``."""
        return SettingError((name, *self.table), self.key, self.message)


def must(ok: bool, text: str, value: Any) -> None:
    """Refuse ``value`` unless ``ok``: ``must(v > 0, "be positive", v)`` -> ``must be positive, got -1``."""
    if not ok:
        raise TraitError(f"must {text}, got {value!r}")
