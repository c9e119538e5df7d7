"""What the privacy ledger offers others: its scope, the shape of a run as shown, and a client for root.

The service (:mod:`paitient.services.ledger.service`) and its page (:mod:`paitient.services.ledger.web`)
both build on this module, and other root-side services ask the ledger through :class:`LedgerReader`
(over ``<run_dir>/ledger.sock``) instead of opening its database. A root caller is known as root by its
peer credentials; the ledger lets root read every project and change nothing.
"""

from __future__ import annotations

import os
from typing import Any

from paitient.channel import ChannelError, ServiceClient
from paitient.config import Budget
from paitient.services.ledger.store import JOB_RUN_PREFIX

READ_SCOPE = "custom:ledger:read"
"""The hub scope of the stewards' page."""

RENEW_SECONDS = 10.0
"""How often the jobs runner renews a running job's reservation (``renew_job``): a reservation the ledger
cannot tie to the runner's process (another pid namespace) lives while renewed within a minute."""

HIDDEN_FIELDS = ("pid", "pid_start")
"""Process details of a run: the ledger's own business, never shown or sent."""


def public_run(row: dict[str, Any]) -> dict[str, Any]:
    """A run as shown to users and other services: without the process details, and with ``trained_by``:
    ``runner`` for a certified job's run (its run id is the runner's, which no kernel may take), ``kernel``
    for every other. The training record's ``mode`` is what the kernel wrote, ``certified job`` too."""
    return {**{k: v for k, v in row.items() if k not in HIDDEN_FIELDS}, "trained_by": trained_by(row)}


def trained_by(row: dict[str, Any]) -> str:
    return "runner" if str(row.get("run_id") or "").startswith(JOB_RUN_PREFIX) else "kernel"


def custom_scopes() -> dict[str, dict[str, str]]:
    """For ``c.JupyterHub.custom_scopes``; grant it (with ``access:services!service=ledger``) to stewards."""
    return {READ_SCOPE: {"description": "Read the privacy-budget ledger of the projects one stewards."}}


def role_scopes() -> list[str]:
    """Scopes a role needs to open the ledger's web page."""
    return [READ_SCOPE, "access:services!service=ledger"]


class UnknownDataset(ChannelError, KeyError):
    """The ledger knows no such project or dataset (a ``KeyError`` too, as a site lookup would raise)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LedgerReader(ServiceClient):
    """A root-side service's read-only questions to the ledger (the airlock's weights check asks these)."""

    service = "ledger"
    default_timeout = 30.0
    errors = {"unknown_project": UnknownDataset, "unknown_dataset": UnknownDataset}
    outside_hint = "Give the site's run directory"

    def __init__(self, run_dir: str | os.PathLike[str], *, timeout: float | None = None):
        super().__init__(run_dir, timeout=timeout)

    def record_by_hash(self, sha256: str) -> dict[str, Any] | None:
        """The settled run whose saved weights have this SHA-256, or None."""
        return self.call("record_by_hash", {"sha256": sha256})

    def total(self, project: str, dataset: str) -> Budget:
        """The dataset's total budget as the ledger applies it (a steward's override or the site's)."""
        answer = self.call("total", {"project": project, "dataset": dataset})
        return Budget(epsilon=float(answer["epsilon"]), delta=float(answer["delta"]))


class JobsLedger(LedgerReader):
    """The training-jobs runner's reservations: budget reserved for a job's researcher, settled by the runner."""

    def reserve(self, *, user: str, job_id: str, project: str, dataset: str, epsilon: float, delta: float) -> str:
        """Reserve ``epsilon``, ``delta`` of ``project/dataset`` for ``user``'s job; returns the reservation id."""
        answer = self.call(
            "reserve_job",
            {
                "user": user,
                "job_id": job_id,
                "project": project,
                "dataset": dataset,
                "epsilon": epsilon,
                "delta": delta,
            },
        )
        return str(answer["reservation"])

    def renew(self, reservation: str) -> None:
        """The job still runs: keeps a reservation the ledger cannot tie to this process alive."""
        self.call("renew_job", {"reservation": reservation})

    def settle(self, reservation: str, epsilon_spent: float, record: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = self.call(
            "settle_job", {"reservation": reservation, "epsilon_spent": epsilon_spent, "record": record}
        )
        return answer
