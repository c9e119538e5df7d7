"""``paitient.server``: the server extension that closes the export paths of the user's server.

Enabled by the config the spawner writes (:mod:`paitient.hub.serverconfig`). It registers refusing handlers
for raw downloads and nbconvert, and checks at start that the rest of the lockdown is in force (terminals
off, the sandbox provisioner, the capped websocket, the confined contents manager); a server whose
configuration lost one of those refuses to start rather than run open.
"""

from __future__ import annotations

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool

from paitient.server.handlers import BLOCKED, BlockedHandler


class LockdownError(RuntimeError):
    """The server's configuration does not carry the workspace's policy."""


class PaitientServerExtension(ExtensionApp):
    name = "paitient"
    description = "Closes downloads, exports and terminals; enforces the output cap."
    load_other_extensions = True

    verify_lockdown = Bool(True, help="Refuse to start when terminals, kernels or contents are not locked down.").tag(
        config=True
    )

    def initialize_handlers(self) -> None:
        self.handlers.extend((pattern, BlockedHandler) for pattern in BLOCKED)

    def initialize_settings(self) -> None:
        if self.verify_lockdown:
            for problem in lockdown_problems(self.serverapp):
                raise LockdownError(f"paitient: the server is not locked down: {problem}")


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
    return problems
