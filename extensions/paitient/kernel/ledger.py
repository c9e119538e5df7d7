"""Kernel-side client of the privacy ledger: a few calls over ``<run dir>/ledger.sock``.

It needs nothing but the socket: the run directory comes from the ``PAITIENT_RUN_DIR`` environment
variable (set by the sandbox provisioner), read when a :class:`LedgerClient` is made without one
(:class:`paitient.channel.ServiceClient` does the rest: timeouts, one error type with a ``code``). Who
is calling is decided by the service from the socket's peer credentials, never from anything sent here.
"""

from __future__ import annotations

import os
from typing import Any

from paitient.channel import TIMEOUT, UNAVAILABLE, ChannelError, ServiceClient

__all__ = ["BudgetExceeded", "LedgerClient", "LedgerUnavailable", "ChannelError"]


class BudgetExceeded(ChannelError):
    """The ledger refused a reservation: the dataset's budget has not enough left (numbers in the message)."""


class LedgerUnavailable(ChannelError):
    """No ledger to talk to (not inside the workspace, the service is down, or it did not answer in time)."""


class LedgerClient(ServiceClient):
    """The kernel's calls to the privacy ledger; every refusal is a :class:`ChannelError` with its ``code``."""

    service = "ledger"
    errors = {"budget_exceeded": BudgetExceeded, UNAVAILABLE: LedgerUnavailable, TIMEOUT: LedgerUnavailable}
    outside_hint = "Train inside a paitient kernel (the workspace sets it)"

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, *, timeout: float = 60.0):
        super().__init__(run_dir, timeout=timeout)

    _call = ServiceClient.call

    def reserve(self, project: str, dataset: str, epsilon: float, delta: float, run_id: str = "") -> dict[str, Any]:
        """Reserve budget before training; the answer holds ``reservation`` (the id) and the dataset's budget."""
        answer: dict[str, Any] = self.call(
            "reserve",
            {
                "project": project,
                "dataset": dataset,
                "epsilon": float(epsilon),
                "delta": float(delta),
                "run_id": run_id,
            },
        )
        return answer

    def settle(
        self,
        reservation: str,
        epsilon_spent: float,
        record: dict[str, Any] | None = None,
        *,
        delta_spent: float | None = None,
    ) -> dict[str, Any]:
        """Record what the run spent (the accountant's epsilon) and its training record; release the rest."""
        args: dict[str, Any] = {
            "reservation": reservation,
            "epsilon_spent": float(epsilon_spent),
            "record": record or {},
        }
        if delta_spent is not None:
            args["delta_spent"] = float(delta_spent)
        settled: dict[str, Any] = self.call("settle", args)
        return settled

    def budget(self, project: str | None = None) -> dict[str, Any]:
        """``{"user": ..., "projects": {project: [per-dataset totals, spent, reserved, left]}}``."""
        budget: dict[str, Any] = self.call("budget", {} if project is None else {"project": project})
        return budget

    def records(self, project: str | None = None, dataset: str | None = None) -> list[dict[str, Any]]:
        """The training records of the caller's projects (optionally one project or dataset)."""
        args = {k: v for k, v in (("project", project), ("dataset", dataset)) if v is not None}
        records: list[dict[str, Any]] = self.call("records", args)
        return records

    def record_by_hash(self, sha256: str) -> dict[str, Any] | None:
        """The training record whose weights have this SHA-256, if one of the caller's projects has it."""
        record: dict[str, Any] | None = self.call("record_by_hash", {"sha256": sha256})
        return record
