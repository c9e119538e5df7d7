"""The runner's one page: ``/services/jobs/metrics``, its queue for the operator's scraper.

The runner has no pages for people (kernels reach it over its socket); it listens on loopback behind the hub
only so that the operator's token can read its metrics (``read:metrics``, :mod:`paitient.services.kit.metrics`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tornado import web

from paitient.services.jobs.metrics import jobs_registry
from paitient.services.jobs.store import JobStore
from paitient.services.kit import metrics, pages

PREFIX = "/services/jobs/"


def make_app(
    site: Any, store: JobStore, prefix: str = PREFIX, *, hub_auth: Any = None, **settings: Any
) -> web.Application:
    """The metrics page's application; ``hub_auth`` defaults to the HubOAuth configured from the hub's env."""
    return pages.make_app(
        [metrics.ROUTE],
        service="jobs",
        prefix=prefix,
        hub_auth=hub_auth,
        paitient_metrics=jobs_registry(site, store),
        **settings,
    )


def run_in_thread(site: Any, store: JobStore, url: str, log: logging.Logger) -> pages.WebThread:
    """Serve the metrics at ``url`` (the hub's ``JUPYTERHUB_SERVICE_URL``) on loopback, in a thread."""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", PREFIX)
    return pages.serve_pages(make_app(site, store, prefix), url, "jobs: the metrics", log)
