"""Every route of the user's server, classified; a route nobody classified is refused.

The server is jupyter_server with JupyterLab and this extension. Each handler class it can route to is
listed in :data:`POLICY` with how its responses reach the browser:

- ``kernel``: the kernel websocket; every message is checked by the gate (:mod:`paitient.server.websocket`).
- ``contents``: the contents API; the bodies of a GET with content (files, notebooks, listings) are
  checked by the contents manager (:mod:`paitient.server.contents`), everything else it answers (models
  without content, errors, what a save or a rename returns) by the output transform.
- ``checked``: an API or a page; its whole response is checked by the output transform
  (:class:`paitient.server.gate.EgressTransform`).
- ``software``: what the software serves from its own root-owned files (JupyterLab's code, settings
  schemas, translations, themes, licences, the kernel spec's logos) or keeps for the browser alone (the
  user's Lab settings and workspace layouts, outside every kernel's reach): nothing of the workspace's
  data, so neither scanned nor counted against the day's bytes.
- ``refused``: answered 403 before the handler runs (downloads, exports, builds).
- ``silent``: the event stream's websocket, answered by :class:`~paitient.server.handlers.SilentEventsWebsocket`,
  which opens and sends nothing.

:func:`install` wraps the application's handler lookup: a request routed to a ``refused`` class, or to a
class missing from the policy (a handler a later extension or upgrade added, also logged), is answered by
:class:`~paitient.server.handlers.BlockedHandler` instead. The tests walk the routes of a
running server and fail on any unclassified one, so a new route is a decision, not an accident.
"""

from __future__ import annotations

import logging
from typing import Any

from tornado import web
from tornado.httputil import HTTPServerRequest

from paitient.server.gate import IF_OK
from paitient.server.handlers import BlockedHandler, SilentEventsWebsocket

log = logging.getLogger("paitient.server.routes")

KERNEL, CONTENTS, CHECKED, SOFTWARE, REFUSED, SILENT = "kernel", "contents", "checked", "software", "refused", "silent"

POLICY: dict[str, str] = {
    # the kernel websocket
    "jupyter_server.services.kernels.websocket.KernelWebsocketHandler": KERNEL,
    # contents
    "jupyter_server.services.contents.handlers.ContentsHandler": CONTENTS,
    "jupyter_server.services.contents.handlers.CheckpointsHandler": CHECKED,
    "jupyter_server.services.contents.handlers.ModifyCheckpointsHandler": CHECKED,
    "jupyter_server.services.contents.handlers.TrustNotebooksHandler": CHECKED,
    "jupyter_server.services.contents.handlers.NotebooksRedirectHandler": CHECKED,
    # APIs the frontend needs
    "jupyter_server.base.handlers.APIVersionHandler": CHECKED,
    "jupyter_server.services.api.handlers.APIStatusHandler": CHECKED,
    "jupyter_server.services.api.handlers.IdentityHandler": CHECKED,
    "jupyter_server.services.api.handlers.PathResolverHandler": CHECKED,
    "jupyter_server.services.kernels.handlers.MainKernelHandler": CHECKED,
    "jupyter_server.services.kernels.handlers.KernelHandler": CHECKED,
    "jupyter_server.services.kernels.handlers.KernelActionHandler": CHECKED,
    "jupyter_server.services.kernelspecs.handlers.MainKernelSpecHandler": CHECKED,
    "jupyter_server.services.kernelspecs.handlers.KernelSpecHandler": CHECKED,
    "jupyter_server.services.sessions.handlers.SessionRootHandler": CHECKED,
    "jupyter_server.services.sessions.handlers.SessionHandler": CHECKED,
    "jupyter_server.services.config.handlers.ConfigHandler": CHECKED,
    "jupyter_server.services.security.handlers.CSPReportHandler": CHECKED,
    "jupyter_server.services.shutdown.ShutdownHandler": CHECKED,
    "jupyter_server.services.events.handlers.EventHandler": CHECKED,
    "jupyter_server.base.handlers.PrometheusMetricsHandler": CHECKED,
    "jupyterlab.handlers.announcements.CheckForUpdateHandler": CHECKED,
    "jupyterlab.handlers.announcements.NewsHandler": CHECKED,
    "jupyterlab.handlers.extension_manager_handler.ExtensionHandler": CHECKED,
    "jupyterlab.handlers.plugin_manager_handler.PluginHandler": CHECKED,
    # pages, redirects, sign-in
    "jupyter_server.base.handlers.MainHandler": CHECKED,
    "jupyter_server.base.handlers.Template404": CHECKED,
    "jupyter_server.base.handlers.TrailingSlashHandler": CHECKED,
    "jupyter_server.base.handlers.RedirectWithParams": CHECKED,
    "jupyter_server.auth.login.LoginFormHandler": CHECKED,
    "jupyter_server.auth.logout.LogoutHandler": CHECKED,
    "jupyterlab_server.handlers.LabHandler": CHECKED,
    "jupyterlab_server.handlers.NotFoundHandler": CHECKED,
    "jupyterhub.singleuser.extension.JupyterHubOAuthCallbackHandler": CHECKED,
    "jupyterhub.singleuser.extension.JupyterHubLogoutHandler": CHECKED,
    # the software's own files, and the browser's own Lab settings and layouts
    "jupyter_server.base.handlers.FileFindHandler": SOFTWARE,
    "jupyter_server.base.handlers.PublicStaticFileHandler": SOFTWARE,
    "jupyter_server.kernelspecs.handlers.KernelSpecResourceHandler": SOFTWARE,
    "jupyter_server.services.api.handlers.APISpecHandler": SOFTWARE,
    "jupyterlab_server.settings_handler.SettingsHandler": SOFTWARE,
    "jupyterlab_server.workspaces_handler.WorkspacesHandler": SOFTWARE,
    "jupyterlab_server.listings_handler.ListingsHandler": SOFTWARE,
    "jupyterlab_server.licenses_handler.LicensesHandler": SOFTWARE,
    "jupyterlab_server.themes_handler.ThemesHandler": SOFTWARE,
    "jupyterlab_server.translations_handler.TranslationsHandler": SOFTWARE,
    # refused
    "paitient.server.handlers.BlockedHandler": REFUSED,
    "paitient.server.handlers.BlockedFilesHandler": REFUSED,
    "jupyter_server.base.handlers.AuthenticatedFileHandler": REFUSED,
    "jupyter_server.files.handlers.FilesHandler": REFUSED,
    "jupyter_server.view.handlers.ViewHandler": REFUSED,
    "jupyter_server.nbconvert.handlers.NbconvertFileHandler": REFUSED,
    "jupyter_server.nbconvert.handlers.NbconvertPostHandler": REFUSED,
    "jupyter_server.services.nbconvert.handlers.NbconvertRootHandler": REFUSED,
    "jupyterlab.handlers.build_handler.BuildHandler": REFUSED,
    # opens, sends nothing
    "jupyter_server.services.events.handlers.SubscribeWebsocket": SILENT,
    "paitient.server.handlers.SilentEventsWebsocket": SILENT,
}


def class_name(handler_class: Any) -> str:
    return f"{handler_class.__module__}.{handler_class.__qualname__}"


def category(handler_class: Any) -> str | None:
    """The policy of a handler class; ``None`` for one nobody classified (it is refused)."""
    return POLICY.get(class_name(handler_class))


def routes(app: web.Application) -> list[tuple[str, Any]]:
    """(pattern, handler class) of every rule the application can route to, in order."""
    out: list[tuple[str, Any]] = []

    def walk(router: Any) -> None:
        for rule in router.rules:
            target = rule.target
            if hasattr(target, "rules"):
                walk(target)
            elif isinstance(target, type):
                regex = getattr(rule.matcher, "regex", None)
                out.append((regex.pattern if regex is not None else repr(rule.matcher), target))

    walk(app.default_router)
    return out


def install(app: web.Application, gate: Any) -> None:
    """Refuse unclassified handlers and tag each request for the output transform."""
    if getattr(app, "_paitient_routes", False):
        return
    find = app.find_handler

    def find_handler(request: HTTPServerRequest, **kwargs: Any) -> web._HandlerDelegate:
        delegate = find(request, **kwargs)
        kind = category(delegate.handler_class)
        if kind is None:
            log.warning(
                "refused %s %s: handler %s is not in the egress policy",
                request.method,
                request.path[:200],
                class_name(delegate.handler_class),
            )
        if kind in (None, REFUSED) and not issubclass(delegate.handler_class, BlockedHandler):
            # refused means refused: the stock handler never runs, whether or not a pattern of
            # handlers.BLOCKED also covers its URL
            delegate = app.get_handler_delegate(request, BlockedHandler)
            kind = REFUSED
        elif kind == SILENT and delegate.handler_class is not SilentEventsWebsocket:
            delegate = app.get_handler_delegate(request, SilentEventsWebsocket)
        passthrough: bool | str = kind in (SOFTWARE, REFUSED, KERNEL, SILENT)
        if kind == CONTENTS and request.method == "GET" and request.query_arguments.get("content", [b"1"])[-1] == b"1":
            passthrough = IF_OK  # the contents manager checked the body; an error's text is checked here
        if not passthrough:
            # tornado answers 304 when this matches the hash of the body before the transform reads it: an
            # oracle for guesses at a body the gate would withhold
            request.headers.pop("If-None-Match", None)
        request._paitient_passthrough = passthrough  # type: ignore[attr-defined]
        request._paitient_gate = gate  # type: ignore[attr-defined]
        return delegate

    app.find_handler = find_handler  # type: ignore[method-assign]
    app._paitient_routes = True  # type: ignore[attr-defined]
