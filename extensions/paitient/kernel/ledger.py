"""Kernel-side client of the privacy ledger: a few calls over ``<run dir>/ledger.sock``.

It needs nothing but the socket: the run directory comes from the ``PAITIENT_RUN_DIR`` environment
variable (set by the sandbox provisioner), read when a :class:`LedgerClient` is made without one. Who
is calling is decided by the service from the socket's peer credentials, never from anything sent here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from paitient.channel import ChannelError, call

__all__ = ["BudgetExceeded", "LedgerClient", "LedgerUnavailable", "ChannelError"]


class BudgetExceeded(ChannelError):
    """The ledger refused a reservation: the dataset's budget has not enough left (numbers in the message)."""


class LedgerUnavailable(ChannelError):
    """No ledger to talk to (not inside the workspace, or the service is down)."""


def default_run_dir() -> Path:
    """``$PAITIENT_RUN_DIR``, where the services' sockets are; :class:`LedgerUnavailable` when it is not set."""
    run_dir = os.environ.get("PAITIENT_RUN_DIR", "")
    if not run_dir:
        raise LedgerUnavailable(
            "PAITIENT_RUN_DIR is not set, so the privacy ledger cannot be reached. Train inside a "
            "paitient kernel (the workspace sets it), or pass run_dir=... explicitly.",
            "unavailable",
        )
    return Path(run_dir)


class LedgerClient:
    """Calls to the privacy ledger over ``<run_dir>/ledger.sock`` (``$PAITIENT_RUN_DIR`` by default)."""

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, *, timeout: float = 60.0):
        self.path = Path(run_dir if run_dir is not None else default_run_dir()) / "ledger.sock"
        self.timeout = timeout

    def _call(self, op: str, args: dict[str, Any]) -> Any:
        try:
            return call(self.path, op, args, timeout=self.timeout)
        except ChannelError as e:
            if e.code == "budget_exceeded":
                raise BudgetExceeded(str(e), e.code) from None
            if e.code == "unavailable":
                raise LedgerUnavailable(str(e), e.code) from None
            raise

    def reserve(self, project: str, dataset: str, epsilon: float, delta: float, run_id: str = "") -> dict[str, Any]:
        """Reserve budget before training; the answer holds ``reservation`` (the id) and the dataset's budget."""
        answer: dict[str, Any] = self._call(
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
        settled: dict[str, Any] = self._call("settle", args)
        return settled

    def budget(self, project: str | None = None) -> dict[str, Any]:
        """``{"user": ..., "projects": {project: [per-dataset totals, spent, reserved, left]}}``."""
        budget: dict[str, Any] = self._call("budget", {} if project is None else {"project": project})
        return budget

    def records(self, project: str | None = None, dataset: str | None = None) -> list[dict[str, Any]]:
        """The runs (reserved, settled, lost) of your projects, or of one project or dataset."""
        args = {k: v for k, v in (("project", project), ("dataset", dataset)) if v is not None}
        records: list[dict[str, Any]] = self._call("records", args)
        return records

    def record_by_hash(self, sha256: str) -> dict[str, Any] | None:
        """The settled run whose training record holds weights with this SHA-256, or None."""
        record: dict[str, Any] | None = self._call("record_by_hash", {"sha256": sha256})
        return record
