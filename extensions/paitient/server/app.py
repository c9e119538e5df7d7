"""``paitient.server``: the server extension that closes the export paths of the user's server.

Enabled by the config the spawner writes (:mod:`paitient.hub.serverconfig`). It registers refusing handlers
for raw downloads and nbconvert, puts the egress gate (:mod:`paitient.server.gate`) in front of every
response (the route policy of :mod:`paitient.server.routes`, the output transform, the kernel websocket and
the contents manager ask it), and checks at start that the rest of the lockdown is in force (terminals off,
the sandbox provisioner, the gated websocket, the confined contents manager); a server whose configuration
lost one of those refuses to start rather than run open.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from tornado.web import HTTPError
from traitlets import Bool, Unicode

from paitient.config import EgressLimits, site_trait
from paitient.server.gate import EgressGate, EgressTransform
from paitient.server.handlers import BLOCKED, BlockedHandler

log = logging.getLogger(__name__)


class LockdownError(RuntimeError):
    """The server's configuration does not carry the workspace's policy."""


class PaitientServerExtension(ExtensionApp):
    name = "paitient"
    description = "Closes downloads, exports and terminals; checks every output at the egress gate."
    load_other_extensions = True

    verify_lockdown = Bool(
        True, help="Refuse to start when terminals, kernels, contents or the egress gate are not locked down."
    ).tag(config=True)
    egress_socket = Unicode(
        "", help="The egress service's socket (<state_dir>/gate/egress.sock); every output is checked there."
    ).tag(config=True)
    fail_closed_bytes = site_trait(EgressLimits, "fail_closed_bytes")
    unchecked_bytes = site_trait(EgressLimits, "unchecked_bytes")

    gate: EgressGate | None = None

    def initialize_handlers(self) -> None:
        self.handlers.extend((pattern, BlockedHandler) for pattern in BLOCKED)

    def initialize_settings(self) -> None:
        from paitient.server import routes
        from paitient.server.contents import ConfinedContentsManager
        from paitient.server.kernels import SandboxMappingKernelManager

        serverapp = self.serverapp
        if serverapp is None:
            raise LockdownError("paitient: the server extension was loaded without a server")
        self.gate = EgressGate(
            self.egress_socket, fail_closed_bytes=self.fail_closed_bytes, unchecked_bytes=self.unchecked_bytes
        )
        web_app = serverapp.web_app
        web_app.settings["paitient_gate"] = self.gate
        if isinstance(serverapp.contents_manager, ConfinedContentsManager):
            serverapp.contents_manager.egress_gate = self.gate
        if isinstance(serverapp.kernel_manager, SandboxMappingKernelManager):
            serverapp.kernel_manager.egress_gate = self.gate
        if hasattr(serverapp.identity_provider, "hub_auth"):  # a hub's user's server (not a bare one, as tests run)
            owner_only(serverapp.identity_provider, os.environ.get("JUPYTERHUB_USER", ""))
        # First, so it sees bodies before any compression.
        web_app.transforms.insert(0, EgressTransform)
        routes.install(web_app, self.gate)
        if self.verify_lockdown:
            for problem in lockdown_problems(serverapp):
                raise LockdownError(f"paitient: the server is not locked down: {problem}")

    async def _start_jupyter_server_extension(self, serverapp) -> None:
        # Every extension has added its routes by now: name the ones the policy does not know (they are
        # refused at request time, and the tests fail on them).
        from paitient.server import routes

        for pattern, handler in routes.routes(serverapp.web_app):
            if routes.category(handler) is None:
                self.log.warning(
                    "paitient: route %s (%s) is not in the egress policy: it is refused",
                    pattern,
                    routes.class_name(handler),
                )

    async def stop_extension(self) -> None:
        if self.gate is not None:
            self.gate.shutdown()


def owner_only(provider: Any, owner: str) -> None:
    """Let ``provider`` (the server's identity provider, JupyterHub's) sign in the server's owner alone.

    JupyterHub lets into a user's server whoever holds ``access:servers`` on it, and its admin role holds it
    for every server and cannot be narrowed: an admin helping a researcher ran her kernels, and her saved
    notebook's script ran in his browser on the hub's origin, where it could make a token in his name. Anyone
    else but the owner is answered 403, as JupyterHub answers a user without the scope. With no owner named
    (not started by the hub) nobody is let in."""
    if getattr(provider, "_paitient_owner_only", ""):
        return
    signed_in = provider.get_user

    async def get_user(handler: Any) -> Any:
        user = signed_in(handler)
        if inspect.isawaitable(user):
            user = await user
        if user is None:
            return None
        hub_user = getattr(user, "hub_user", None) or {}
        if hub_user.get("kind", "user") == "user" and owner and getattr(user, "username", None) == owner:
            return user
        log.warning(
            "refused %s %r on the server of %r: only its owner signs in here",
            hub_user.get("kind", "user"),
            getattr(user, "username", None),
            owner,
        )

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise HTTPError(403, f"This is the server of {owner}; only its owner signs in here.")

        handler.redirect = refuse  # as JupyterHub's refusal: tornado's sign-in redirect becomes the 403
        return None

    provider.get_user = get_user
    provider._paitient_owner_only = owner or "(nobody)"


def lockdown_problems(serverapp) -> list[str]:
    """What in a running server's configuration breaks the workspace policy (empty: nothing)."""
    from paitient.server.contents import ConfinedContentsManager
    from paitient.server.kernels import SandboxKernelSpecManager, SandboxMappingKernelManager
    from paitient.server.websocket import CappedWebsocketConnection

    problems = []
    if serverapp.terminals_enabled:
        problems.append("terminals are enabled (set ServerApp.terminals_enabled = False)")
    checks = (
        ("kernel_manager", SandboxMappingKernelManager),
        ("kernel_spec_manager", SandboxKernelSpecManager),
        ("contents_manager", ConfinedContentsManager),
    )
    for attr, cls in checks:
        if not isinstance(getattr(serverapp, attr), cls):
            problems.append(f"ServerApp.{attr} is not a {cls.__name__}")
    if not issubclass(serverapp.kernel_websocket_connection_class, CappedWebsocketConnection):
        problems.append("ServerApp.kernel_websocket_connection_class is not CappedWebsocketConnection")
    if serverapp.kernel_manager.kernel_spec_manager.ensure_native_kernel:
        problems.append("KernelSpecManager.ensure_native_kernel is on")
    web_app = getattr(serverapp, "web_app", None)
    gate = web_app.settings.get("paitient_gate") if web_app is not None else None
    if gate is None or not gate.socket_path:
        problems.append("the egress gate has no service socket (set PaitientServerExtension.egress_socket)")
    if web_app is not None and (not web_app.transforms or web_app.transforms[0] is not EgressTransform):
        problems.append("the egress transform is not the first output transform")
    if web_app is not None and not getattr(web_app, "_paitient_routes", False):
        problems.append("the route policy is not installed")
    problem = identity_problem(serverapp.identity_provider)
    if problem:
        problems.append(problem)
    return problems


def identity_problem(provider: Any) -> str:
    """What is wrong with who the server signs in (``""``: nothing): the hub's identity provider must let in
    the server's owner alone (:func:`owner_only`)."""
    if hasattr(provider, "hub_auth") and not getattr(provider, "_paitient_owner_only", ""):
        return "the hub's identity provider lets in others than the server's owner"
    return ""
