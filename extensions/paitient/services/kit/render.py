"""The services' page templates: Jinja2 with every value escaped, one base template (``kit/base.html``) with
the header that links the services' pages, and the values that base needs. Pure: no request, no I/O
beyond reading the templates, so a page renders the same in a test as behind the hub."""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from paitient.config.workspace import service_origin
from paitient.services import PAGES

HERE = Path(__file__).parent


def escape(value: Any) -> Markup:
    """How every ``{{ value }}`` of a page is escaped: the standard library's ``html.escape`` with quotes, the
    entities tornado and the earlier pages wrote (``&quot;``, ``&#x27;``); markup the template made stays."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))  # noqa: S704 - escaped on this line


def environment(template_dir: str | os.PathLike[str] | None = None) -> jinja2.Environment:
    """Templates of one service (``template_dir``) plus the kit's own as ``kit/...``; everything escaped.

    Autoescape is on, and :func:`escape` runs on every expression's value first (``finalize``), so a value
    is escaped once, the same way on every page; an undefined name is an error, not an empty string.
    """
    loaders: list[jinja2.BaseLoader] = [jinja2.PrefixLoader({"kit": jinja2.FileSystemLoader(HERE / "templates")})]
    if template_dir is not None:
        loaders.insert(0, jinja2.FileSystemLoader(template_dir))
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        autoescape=True,
        finalize=escape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def nav_links(prefix: str, service: str, hub_prefix: str, hub_host: str = "") -> list[dict[str, Any]]:
    """The header's links: every service's pages (siblings of ``prefix`` under the hub) and the hub's home.

    ``hub_host`` is the hub's origin where the site gives each service one of its own (``[workspace]
    subdomain_host``; JupyterHub tells a service in ``JUPYTERHUB_HOST``): the other services' pages and the
    hub are then on other origins, linked in full."""
    links = []
    suffix = f"/{service}/"
    root = prefix[: -len(suffix) + 1] if prefix.endswith(suffix) else None
    for name, title in PAGES.items():
        if name == service:
            links.append({"title": title, "href": prefix, "current": True})
        elif root is not None:
            links.append({"title": title, "href": f"{service_origin(hub_host, name)}{root}{name}/", "current": False})
    links.append({"title": "Hub", "href": hub_host + hub_prefix.rstrip("/") + "/home", "current": False})
    return links


def base_namespace(
    *,
    service: str,
    prefix: str,
    user: dict[str, Any] | None,
    hub_prefix: str = "/hub/",
    hub_host: str = "",
    static_url: Callable[[str], str] | None = None,
    xsrf_form_html: Callable[[], str] | None = None,
) -> dict[str, Any]:
    """What ``kit/base.html`` needs: the service, its prefix, the signed-in user, links, static files, forms."""

    def no_forms() -> str:
        raise RuntimeError("a form needs a request's XSRF token; render it from a page handler")

    return {
        "prefix": prefix,
        "user": user,
        "service_title": PAGES.get(service, service),
        "nav": nav_links(prefix, service, hub_prefix, hub_host),
        "static_url": static_url or (lambda path: f"{prefix}static/{path}"),
        # tornado's hidden input with the XSRF token (its value escaped by tornado)
        "xsrf_form_html": lambda: Markup((xsrf_form_html or no_forms)()),  # noqa: S704
    }


def render(env: jinja2.Environment, template: str, namespace: dict[str, Any], **values: Any) -> str:
    """The HTML of ``template`` with the base namespace and the page's own values (pure; everything escaped)."""
    return env.get_template(template).render({**namespace, **values})
