"""JupyterHub configuration derived from the site configuration.

One function, :func:`configure`, sets every hub setting paitient needs on a traitlets Config. It is used
by ``paitient up`` (through ``paitient hub``) and by ``hub_config/jupyterhub_config.py`` for operators
who run ``jupyterhub`` themselves, so both run the same policy.
"""

from __future__ import annotations

import importlib
from typing import Any

from traitlets.config import Config

from paitient.config import SiteConfig
from paitient.hub import landing, tokens
from paitient.hub.culler import culler_role, culler_service
from paitient.hub.paths import HubPaths, venv_python
from paitient.hub.signon import OWN_SCOPES
from paitient.services import SERVICES
from paitient.services.kit.metrics import METRICS_SCOPE
from paitient.services.kit.process import separate_service, token_secret

# The operator's own token: `paitient up` uses it to stop user servers on shutdown and to check readiness.
OPERATOR_SERVICE = "paitient-operator"
# The token a metrics scraper (Prometheus) presents: `read:metrics` only, for /hub/metrics and each service's
# /services/NAME/metrics. It is kept in <state_dir>/hub/metrics_token (root 0600).
METRICS_SERVICE = "paitient-metrics"

# A researcher's own-account scopes leave out `tokens` (see paitient.hub.tokens); a steward's `self` keeps it.
RESEARCHER_SCOPES = [*OWN_SCOPES, "access:services", "custom:airlock:request", "custom:airlock:download"]
# Nothing over every account or group: the services say which users a steward reads (their projects' members);
# list:users, read:users:name and read:groups gave any project's member list through the hub's API.
STEWARD_SCOPES = [
    "self",
    "access:services",
    "custom:airlock:review",
    "custom:ledger:read",
    "custom:audit:read",
    "custom:egress:read",
]


NO_OPTIONS_MESSAGE = (
    "This workspace takes no server options: every server starts as the site configuration says. Start it "
    "without options (JupyterLab and the hub's home page send none)."
)


def refuse_user_options(spawner: Any, user_options: dict[str, Any]) -> None:
    """``Spawner.apply_user_options``: any option the browser sends with a start (the REST API takes a dict of
    them, and a spawner that reads one, KubeSpawner with a profile list, would take an image, volumes or
    resources from it) is refused with a 400 saying so; none starts nothing different. JupyterHub keeps a
    start's options as the default of every later start, so they are dropped too: the next start, without
    options, is not refused again."""
    from sqlalchemy import inspect
    from tornado import web

    if not user_options:
        return
    spawner.user_options = {}
    orm_spawner = getattr(spawner, "orm_spawner", None)
    if orm_spawner is not None and orm_spawner.user_options:
        orm_spawner.user_options = {}
        session = inspect(orm_spawner).session
        if session is not None:
            session.commit()
    raise web.HTTPError(400, NO_OPTIONS_MESSAGE)


def managed_services(site: SiteConfig) -> list[Any]:
    """The root-side service modules (each exposes ``hub_service(site, python)`` and ``custom_scopes()``)."""
    return [importlib.import_module(module) for module in SERVICES.values()]


def hub_db_url(site: SiteConfig) -> str:
    """The hub's database: SQLite under ``<state_dir>/hub``, or the schema ``hub`` of ``[database] url`` (made
    here when missing; JupyterHub makes its tables in it, and ``jupyterhub upgrade-db`` upgrades them)."""
    if not site.database.url:
        return HubPaths.of(site).db_url
    from paitient.services.kit.db import Location, prepare_schema

    where = Location(HubPaths.of(site).hub_dir / "jupyterhub.sqlite", site.database.url, "hub", site.database.passfile)
    return prepare_schema(where, "hub")


def configure(
    c: Config,
    site: SiteConfig,
    *,
    directory_url: str,
    hub_port: int,
    proxy_api_port: int,
    separate_services: dict[str, int] | None = None,
) -> Config:
    """The hub's configuration for ``site``. ``separate_services`` (name -> port of its pages): the services
    run on their own (systemd units, ``paitient up --separate-services``); the hub routes to and signs in
    for those with pages and starts none. None: the hub starts every service as its managed service."""
    paths = HubPaths.of(site)
    w = site.workspace

    # -- network: the public proxy port, the hub and proxy API on loopback only -----------------------
    c.JupyterHub.bind_url = f"http://{w.bind_ip}:{w.port}/"
    c.JupyterHub.hub_ip = "127.0.0.1"
    c.JupyterHub.hub_port = hub_port
    c.ConfigurableHTTPProxy.should_start = False
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{proxy_api_port}"
    c.ConfigurableHTTPProxy.auth_token = paths.secret("proxy_token")
    if w.subdomain_host:
        # Each server and each service on an origin of its own (security model, 17b); the proxy routes by
        # host (`--host-routing`, paitient.ops.commands.proxy_command), the hub stays at the host itself.
        # JupyterHub's default subdomain hook ("idna") names them; services.kit.render links to the same names.
        c.JupyterHub.subdomain_host = w.subdomain_host

    # -- state ----------------------------------------------------------------------------------------
    c.JupyterHub.db_url = hub_db_url(site)
    c.JupyterHub.cookie_secret_file = str(paths.cookie_secret_file)
    c.JupyterHub.pid_file = str(paths.hub_dir / "jupyterhub.pid")
    # A hub restart (upgrade, configuration change) leaves researchers' servers running;
    # `paitient up` stops them itself on a full shutdown.
    c.JupyterHub.cleanup_servers = False
    c.JupyterHub.cleanup_proxy = False
    c.JupyterHub.internal_ssl = False

    # -- who may sign in ------------------------------------------------------------------------------
    from paitient.hub.auth import configure_from_site

    c.JupyterHub.authenticator_class = "paitient-ldap"
    configure_from_site(c, site, directory_url)
    c.Authenticator.manage_groups = True
    c.Authenticator.manage_roles = True
    # Managed role assignments are rebuilt at start from the holders recorded at sign-in
    # (paitient.hub.roleholders), so a hub restart keeps them and a withdrawn role goes.
    c.Authenticator.reset_managed_roles_on_startup = True
    c.Authenticator.auto_login = False

    # -- where they land, what they see ------------------------------------------------------------------
    # Researchers go from the login form to their server's progress page and on into JupyterLab; a
    # server that stopped (idle) is started again after a moment instead of waiting on a button.
    # Stewards land at the airlock's review page (paitient.hub.landing).
    c.JupyterHub.default_url = landing.default_url
    c.JupyterHub.redirect_to_server = True
    c.JupyterHub.implicit_spawn_seconds = 1
    # The menu lists the Token page only to those who may hold tokens (paitient.hub.tokens).
    c.JupyterHub.template_paths = [str(tokens.TEMPLATES)]
    c.JupyterHub.template_vars = {"paitient_offers_tokens": tokens.offers_tokens}

    # -- what they get --------------------------------------------------------------------------------
    c.JupyterHub.spawner_class = site.workspace.spawner
    c.JupyterHub.allow_named_servers = False
    c.Spawner.apply_user_options = refuse_user_options
    c.Spawner.site_file = site.source
    c.Spawner.site_state_dir = str(site.state_dir)
    c.Spawner.default_url = "/lab"
    c.Spawner.start_timeout = 60
    c.Spawner.http_timeout = 60

    # -- roles, scopes, services -------------------------------------------------------------------------
    python = venv_python()
    services = [
        {"name": OPERATOR_SERVICE, "api_token": paths.secret("operator_token"), "display": False},
        {"name": METRICS_SERVICE, "api_token": paths.secret("metrics_token"), "display": False},
    ]
    custom_scopes: dict[str, dict] = {}
    for name, module in zip(SERVICES, managed_services(site), strict=True):
        if separate_services is None:
            services.append(module.hub_service(site, python))
        else:
            entry = module.hub_service(site, python, port=separate_services.get(name, 0))
            separate = separate_service(entry, paths.secret(token_secret(name)))
            if separate is not None:
                if name not in separate_services:
                    raise ValueError(f"the service {name} has pages but --separate-services names no port for it")
                services.append(separate)
        custom_scopes.update(module.custom_scopes())
    culler = culler_service(site, python, paths.hub_dir)
    if culler is not None:
        services.append(culler)
    c.JupyterHub.services = services
    c.JupyterHub.custom_scopes = custom_scopes
    missing = {s for s in RESEARCHER_SCOPES + STEWARD_SCOPES if s.startswith("custom:")} - set(custom_scopes)
    if missing:
        raise RuntimeError(f"scopes {sorted(missing)} are granted to roles but no service defines them")
    # researcher and steward are managed by the authenticator (synchronised from the directory at sign-in)
    c.PaitientLDAPAuthenticator.researcher_scopes = RESEARCHER_SCOPES
    c.PaitientLDAPAuthenticator.steward_scopes = STEWARD_SCOPES
    c.JupyterHub.load_roles = [
        # Every signed-in user holds `user`; JupyterHub's own gives `self`, which includes `tokens`.
        {"name": "user", "scopes": list(OWN_SCOPES)},
        {
            "name": "paitient-operator",
            "description": "Used by `paitient up` to manage servers",
            "scopes": [
                "list:users",
                "read:users",
                "read:servers",
                "delete:servers",
                "list:groups",
                "read:groups",
                "read:roles:users",
            ],
            "services": [OPERATOR_SERVICE],
        },
        {
            # Aggregates of the hub and the services, for the operator's scraper; no researcher or steward
            # role holds read:metrics (JupyterHub's admin role does: admins operate the workspace).
            "name": METRICS_SERVICE,
            "description": "Reads the hub's and the services' Prometheus metrics",
            "scopes": [METRICS_SCOPE],
            "services": [METRICS_SERVICE],
        },
        *([culler_role()] if culler is not None else []),
    ]
    # /hub/metrics answers only tokens with read:metrics (JupyterHub's default, kept whatever it becomes).
    c.JupyterHub.authenticate_prometheus = True
    return c
