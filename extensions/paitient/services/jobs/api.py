"""What the training runner offers other root-side services: a finished job's signed record and weights."""

from __future__ import annotations

import base64
import os
from typing import Any

from paitient.channel import ServiceClient


class JobsReader(ServiceClient):
    """The airlock's call to the runner over ``<run_dir>/jobs.sock`` (as root)."""

    service = "jobs"
    default_timeout = 60.0
    outside_hint = "Give the site's run directory"

    def __init__(self, run_dir: str | os.PathLike[str], *, timeout: float | None = None):
        super().__init__(run_dir, timeout=timeout)

    def release(self, job_id: str, user: str) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
        """The signed record and the weights of ``user``'s finished job ``job_id``, and the graph it trained
        as a steward reads it: ``lines`` (:func:`paitient.services.jobs.graph.listing`) and ``numbers``."""
        answer = self.call("release", {"job_id": job_id, "user": user})
        return answer["record"], base64.b64decode(answer["weights"]), dict(answer["graph"])
