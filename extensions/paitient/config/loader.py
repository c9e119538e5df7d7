"""Reading the site file: TOML -> validated, frozen :class:`SiteConfig`, or a :class:`ConfigError` that names
the file, the key and what is allowed."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from paitient.config.errors import ConfigError, SettingError
from paitient.config.site import SECTIONS, SiteConfig

EMBEDDED_SITE = Path(__file__).resolve().parents[1] / "embedded_site.toml"
"""The embedded default: a demo directory and two demo projects (``paitient up`` without ``--site``)."""

TOP_LEVEL = (*SECTIONS, "projects")


def where(table: tuple[str, ...]) -> str:
    """How the site file spells a table: ``[server]``, ``[[projects]] entry 2``, ``[projects.onc.budget]``."""
    if not table:
        return ""
    if table[0] == "projects":
        if len(table) == 1:
            return "[[projects]]"
        if table[1].isdigit():
            return f"[[projects]] entry {table[1]}" + "".join(f" {t}" for t in table[2:])
    return "[" + ".".join(table) + "]"


def describe(error: SettingError, origin: str) -> str:
    label = where(error.table)
    if error.key is not None:
        label = f"{label} {error.key}:" if label else f"{error.key}:"
    return " ".join(part for part in (f"{origin}:", label, error.message) if part)


def parse(
    raw: dict[str, Any],
    source: str = "",
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    origin: str = "",
) -> SiteConfig:
    """Build a validated, frozen :class:`SiteConfig` from a parsed TOML document.

    ``overrides`` (section -> key -> value, e.g. from the command line) win over the document and are
    checked by the same rules. ``source`` becomes ``site.source``; errors begin with ``origin`` (the file
    as the user named it), else ``source``.
    """
    origin = origin or source or "site configuration"
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a TOML document (a table), got {raw!r}")
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{origin}: unknown section(s) {', '.join(unknown)}; sections: {', '.join(TOP_LEVEL)}")
    values = dict(raw)
    for section, changes in (overrides or {}).items():
        if section not in SECTIONS:
            raise ConfigError(f"override: unknown section {section!r}; sections: {', '.join(SECTIONS)}")
        table = values.get(section, {})
        values[section] = {**table, **changes} if isinstance(table, dict) else table
    try:
        site = SiteConfig(**values, source=source)
        site.check_all()
    except SettingError as e:
        changed = (overrides or {}).get(e.table[0] if e.table else "", {})
        raise ConfigError(describe(e, "override" if len(e.table) == 1 and e.key in changed else origin)) from None
    return site


def load(path: str | os.PathLike[str] | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> SiteConfig:
    """Read and validate the site configuration; ``None`` gives the embedded demo default."""
    if path is None:
        raw = tomllib.loads(EMBEDDED_SITE.read_text(encoding="utf-8"))
        return parse(raw, source="", overrides=overrides, origin=str(EMBEDDED_SITE))
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"site configuration {p} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"site configuration {p} is not UTF-8 text: {e}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"site configuration {p} is not valid TOML: {e}") from None
    return parse(raw, source=str(p.resolve()), overrides=overrides, origin=str(p))


def check_owner(path: Path, *, secret: bool = False) -> None:
    """Refuse a file that a non-root user could change (or, if ``secret``, read)."""
    st = path.stat()
    if st.st_uid != 0:
        raise ConfigError(f"{path} must be owned by root (owner uid is {st.st_uid}); run: chown root {path}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{path} is writable by group or others; run: chmod go-w {path}")
    if secret and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"it must be readable by root only: chmod 600 {path}"
        )
