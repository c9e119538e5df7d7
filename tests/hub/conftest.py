"""Real directories for the hub tests: the demo hospital (``slapd``) and custom ones (``make_slapd``).

Every slapd here runs as our child on a free loopback port and is stopped by its pid at teardown.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from traitlets.config import Config

from paitient.config import EMBEDDED_SITE, SiteConfig, parse
from paitient.hub.auth import PaitientLDAPAuthenticator, configure_from_site
from paitient.ops.directory import DEFAULT_SCHEMAS, DemoDirectory, Slapd


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[DemoDirectory]:
    """The demo hospital (alice, bob, carol in projects; dave in none; sam the steward), started.

    ``slapd.url``, ``slapd.credentials()`` (username -> password), ``slapd.stop()`` / ``start()``
    (a restart keeps the port).
    """
    directory = DemoDirectory(tmp_path / "state")
    directory.start()
    yield directory
    directory.stop()


@pytest.fixture
def make_slapd(tmp_path: Path) -> Iterator[Callable[..., Slapd]]:
    """Factory for directories with arbitrary content: ``make(suffix, ldif, schemas=..., name=...,
    tls_files=(cert, key))``."""
    started: list[Slapd] = []

    def make(suffix: str, ldif: str, *, schemas=DEFAULT_SCHEMAS, name: str = "ldap", tls_files=None) -> Slapd:
        server = Slapd(tmp_path / name, suffix, schemas=schemas, tls_files=tls_files)
        server.configure()
        server.load(ldif)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def _demo_site(state_dir: Path, **directory) -> SiteConfig:
    raw = tomllib.loads(EMBEDDED_SITE.read_text())
    raw["workspace"]["state_dir"] = str(state_dir)
    raw["directory"].update(directory)
    return parse(raw)


@pytest.fixture
def demo_site(tmp_path: Path) -> Callable[..., SiteConfig]:
    """``demo_site(**directory_keys)``: the embedded default site, state under tmp_path/state, with
    [directory] keys overridden (e.g. ``url=..., lookup_dn=True``)."""
    return lambda **directory: _demo_site(tmp_path / "state", **directory)


@pytest.fixture
def make_authenticator() -> Callable[..., PaitientLDAPAuthenticator]:
    """``make_authenticator(site, url=None, cls=PaitientLDAPAuthenticator, **traits)``: configured exactly
    as the hub configures it from the site (``configure_from_site``), plus extra traits."""

    def make(
        site: SiteConfig,
        url: str | None = None,
        cls: type[PaitientLDAPAuthenticator] = PaitientLDAPAuthenticator,
        **traits,
    ) -> PaitientLDAPAuthenticator:
        c = Config()
        configure_from_site(c, site, url)
        for name, value in traits.items():
            setattr(c.PaitientLDAPAuthenticator, name, value)
        return cls(config=c)

    return make
