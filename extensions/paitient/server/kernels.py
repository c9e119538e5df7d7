"""Kernel spec and kernel managers of the user's server: every kernel is a sandboxed one.

A stock server starts any spec it can find (and ``allowed_kernelspecs`` only filters the listing), reads
specs from the user's own data dir, and adds a native kernel. Here specs come only from the root-owned
folders the spawner configured (``kernel_dirs``), only the allowed names start, every spec is forced onto
the ``paitient-sandbox`` provisioner, and a client cannot choose a kernel id that escapes the runtime dir.

A kernel's activity times leave the server to the minute only (:func:`to_the_minute`): the kernels API and
sessions API give each kernel's ``last_activity``, and the server reports its last activity (its kernels'
latest) to the hub, whose API the user's browser reads. To the microsecond, the time of a kernel's last
output would be some twenty bits of the kernel's choice in each report, stored until the browser reads it.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_server._tz import isoformat
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import List, Unicode, default, observe

from paitient.rules.sandbox import PolicyError

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class KernelNotInSandbox(NoSuchKernel, web.HTTPError):
    """A client asked for a kernel name the server does not offer: 404 from the kernels API, 501 (as for any
    unknown kernel) from the sessions API."""

    def __init__(self, name: str, known: list[str]):
        message = (
            f"No kernel named {name!r} here; every kernel runs in the sandbox. Available: {', '.join(known) or 'none'}"
        )
        web.HTTPError.__init__(self, 404, message.replace("%", "%%"))
        self.name = name

    def __str__(self) -> str:
        return (self.log_message or "") % ()


class SandboxKernelSpecManager(KernelSpecManager):
    """Kernel specs from the configured root-owned folders only, each one bound to the sandbox provisioner."""

    provisioner_name = Unicode(
        "paitient-sandbox", help="Provisioner every kernel spec is started with, whatever the spec says."
    ).tag(config=True)

    sandbox_kernel_dirs = List(
        Unicode(),
        help="The only folders kernel specs are read from (root-owned; the user's data dirs are never searched).",
    ).tag(config=True)

    @default("kernel_dirs")
    def _kernel_dirs_default(self) -> list[str]:
        if not self.sandbox_kernel_dirs:
            raise ValueError(
                "SandboxKernelSpecManager.sandbox_kernel_dirs is empty; the spawner writes it with "
                "paitient.hub.serverconfig.write_user_server_config"
            )
        return list(self.sandbox_kernel_dirs)

    def _allowed(self, name: str) -> bool:
        return not self.allowed_kernelspecs or name in self.allowed_kernelspecs

    def find_kernel_specs(self) -> dict[str, str]:
        return {n: d for n, d in super().find_kernel_specs().items() if self._allowed(n)}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if not self._allowed(kernel_name):
            raise NoSuchKernel(kernel_name)
        spec = super().get_kernel_spec(kernel_name)
        spec.metadata = {**spec.metadata, "kernel_provisioner": {"provisioner_name": self.provisioner_name}}
        spec.interrupt_mode = "message"
        return spec

    def get_all_specs(self) -> dict[str, Any]:
        out = super().get_all_specs()
        for model in out.values():
            model["spec"].setdefault("metadata", {})["kernel_provisioner"] = {"provisioner_name": self.provisioner_name}
        return out


def to_the_minute(when: datetime) -> datetime:
    """``when`` without its seconds: the whole minute it falls in."""
    return when.replace(second=0, microsecond=0)


class SandboxMappingKernelManager(AsyncMappingKernelManager):
    """Refuses kernel names that are not allowed and client-chosen kernel ids that are not UUIDs; shows
    kernels' activity times to the minute; lets the egress gate drop a removed kernel's output cap."""

    egress_gate: Any = None
    """The server's :class:`~paitient.server.gate.EgressGate`, set by the server extension."""

    def remove_kernel(self, kernel_id: str) -> Any:
        # Called once a kernel is shut down for good (not on a restart, which keeps its id): its output cap,
        # which holds the headers of its latest requests, would otherwise stay as long as the server.
        removed = super().remove_kernel(kernel_id)
        if self.egress_gate is not None:
            self.egress_gate.forget_kernel(str(kernel_id))
        return removed

    @observe("last_kernel_activity")
    def _last_kernel_activity_to_the_minute(self, change: dict[str, Any]) -> None:
        # What the server reports to the hub (ServerWebApplication.last_activity takes the latest of this, the
        # server's start and the browser's own API requests). Setting the rounded value notifies once more,
        # with nothing left to round.
        when = change["new"]
        if isinstance(when, datetime) and to_the_minute(when) != when:
            self.last_kernel_activity = to_the_minute(when)

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        model = super().kernel_model(kernel_id)
        when = getattr(self._kernels[kernel_id], "last_activity", None)
        if isinstance(when, datetime):
            model["last_activity"] = isoformat(to_the_minute(when))
        return model

    # The async manager replaces the synchronous MultiKernelManager.start_kernel with a coroutine itself; mypy
    # compares against the synchronous signature.
    async def start_kernel(self, *args: Any, kernel_id: str | None = None, **kwargs: Any) -> str:  # type: ignore[override]
        name = kwargs.get("kernel_name") or self.default_kernel_name
        if kernel_id is not None and kernel_id not in self and not UUID_RE.match(str(kernel_id)):
            raise web.HTTPError(400, "kernel_id must be a UUID (or leave it out)")
        if kernel_id is None or kernel_id not in self:
            spec_manager = self.kernel_spec_manager
            if spec_manager is None:
                raise web.HTTPError(500, "the server has no kernel spec manager; ask the workspace operator")
            specs = spec_manager.find_kernel_specs()
            if name not in specs:
                raise KernelNotInSandbox(name, sorted(specs))
            kwargs["kernel_name"] = name
        try:
            return await super().start_kernel(*args, kernel_id=kernel_id, **kwargs)
        except PolicyError as e:
            # The sandbox's refusal says why and what to do (the launcher's limit on an account's kernels, a
            # connection file out of place); as a plain exception it would reach JupyterLab's "Error Starting
            # Kernel" dialog as "Unhandled error".
            raise web.HTTPError(403, str(e).replace("%", "%%")) from None
