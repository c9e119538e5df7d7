"""The user's server process: JupyterHub's single-user server (``jupyterhub.singleuser``), started lighter.

Three things every user's server would otherwise load and never use are left out before JupyterHub is
imported:

- jsonschema checks the ``iri`` string format with ``rfc3987_syntax`` whenever that package is installed, and
  importing it compiles a grammar: about 0.7 s of CPU and 15 MiB in every server, for a format no schema of
  the server uses (jupyter_events validates its event schemas with jsonschema). It is marked absent
  (:data:`SKIPPED`), so jsonschema leaves that one format unchecked; every other check is unchanged.
- httpx's command-line client (``httpx._main``, with rich, click and pygments: about 4 MiB), which httpx
  imports whenever those are installed; JupyterLab's extension manager imports httpx. Marked absent, httpx
  takes its own fallback (``httpx.main`` says the client is not installed); the library is unchanged.
- JupyterHub's database layer. ``jupyterhub.singleuser`` needs a few of JupyterHub's modules (the HTTP client
  that talks to the hub, the request log, ``services.auth`` and its scope arithmetic), but these import the
  hub's: ``jupyterhub.log`` imports ``handlers.pages`` (the hub's web pages, its ORM, spawners and users) for
  one class, ``jupyterhub.scopes`` imports ``orm``, ``roles`` and SQLAlchemy for the functions that take a
  database, ``jupyterhub.utils`` imports SQLAlchemy's exceptions for a decorator of the hub's handlers. That
  is SQLAlchemy, alembic and the hub's handlers: about 35 MiB in every server. :data:`LEFT_OUT` puts a
  placeholder in their place: a module that holds only the names imported from it at load time and raises
  :class:`LeftOutError` for anything else, so a JupyterHub that came to need one of them fails loudly, at
  start or at its first use, instead of loading it. What the server runs is JupyterHub's code unchanged:
  the scope checks it makes without a database (``services.auth.check_scopes``) touch none of them.

``python -I -m paitient.server.singleuser`` takes the arguments of ``jupyterhub-singleuser``.
"""

from __future__ import annotations

import importlib
import sys
import types

SKIPPED = ("rfc3987_syntax", "httpx._main")
"""Modules the server never imports (see above)."""


class LeftOutError(AttributeError):
    """A name of a module the user's server leaves out (:data:`LEFT_OUT`) was used."""


class LeftOut(types.ModuleType):
    """A placeholder for a module the user's server leaves out: only the names it was given."""

    def __getattr__(self, name: str) -> object:
        raise LeftOutError(
            f"{self.__name__}.{name}: the user's server leaves {self.__name__} out "
            f"(paitient.server.singleuser.LEFT_OUT); this JupyterHub needs it, remove it from that list"
        )


class _NeverRaised(Exception):
    """``sqlalchemy.exc.SQLAlchemyError`` where SQLAlchemy is not loaded: nothing can raise it."""


class _NotServed:
    """``jupyterhub.handlers.pages.HealthCheckHandler``, the hub's health check: no handler of the user's
    server is one (``jupyterhub.log.log_request`` logs those quieter)."""


LEFT_OUT: dict[str, dict[str, object]] = {
    "sqlalchemy": {},
    "sqlalchemy.exc": {"SQLAlchemyError": _NeverRaised},
    "jupyterhub.orm": {},
    "jupyterhub.roles": {},
    "jupyterhub.handlers.pages": {"HealthCheckHandler": _NotServed},
}
"""Modules the server leaves out, with the names JupyterHub's single-user modules import from them."""


def skip_unneeded() -> None:
    """Mark :data:`SKIPPED` absent (an ``import`` of them raises ImportError) and put :data:`LEFT_OUT` in
    place, each unless already imported."""
    for name in SKIPPED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    importlib.import_module("jupyterhub")  # the package alone (its version): the placeholders become attributes
    for name, names in LEFT_OUT.items():
        if name in sys.modules:
            continue
        placeholder = LeftOut(name, "Left out of the user's server: see paitient.server.singleuser.")
        placeholder.__dict__.update(names)
        sys.modules[name] = placeholder
        package, _, attribute = name.rpartition(".")
        if package in sys.modules:  # as an import leaves a module: an attribute of its package
            setattr(sys.modules[package], attribute, placeholder)


def main() -> None:
    skip_unneeded()
    from jupyterhub.singleuser import main as singleuser_main

    singleuser_main()


if __name__ == "__main__":
    main()
