"""Prometheus metrics of the root-side services: aggregates only, read by the operator's scraper.

Each service keeps a :class:`MetricsRegistry` of its own (never prometheus_client's global one, which would
mix in whatever any imported library registers) and serves it at ``/services/NAME/metrics`` beside its pages.
Counters and histograms count what the process did since it started; :class:`Reading` collectors read their
numbers from the service's store at each scrape, so those survive a restart.

What the numbers may say is fixed here, not left to each service: a sample may carry only the labels in
:data:`AGGREGATE_LABELS` (a project, a dataset, a state, a channel, ...), never a user, an account, a uid or a
request, and every name starts ``paitient_``. A registry that would send anything else answers nothing (the
scrape fails with 500 and the service logs why).

The page needs the hub scope ``read:metrics``: the one JupyterHub's own ``/hub/metrics`` requires, held by the
operator's metrics token (``paitient.hub.hubconfig.METRICS_SERVICE``) and JupyterHub's admins, not by
researchers or stewards. Anyone else gets 403, with no redirect to a login: a scraper signs in with its token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from paitient.services.kit.pages import ScopedPage

METRICS_SCOPE = "read:metrics"
PREFIX = "paitient_"
AGGREGATE_LABELS = frozenset(
    {"project", "dataset", "state", "kind", "channel", "verdict", "reason", "action", "outcome", "le", "quantile"}
)
"""The label names a sample may carry: each value is one of a few the site or the code defines. A label that
could name a person (user, account, uid) or an object of one (a request, a job, a reservation) is not here."""


class PersonalLabel(ValueError):
    """A metric would leave the aggregates: a label outside :data:`AGGREGATE_LABELS`, or a foreign name."""


class MetricsRegistry(CollectorRegistry):
    """A service's own registry; :meth:`collect` refuses a metric that is not an aggregate of paitient's."""

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            if not family.name.startswith(PREFIX):
                raise PersonalLabel(f"metric {family.name!r} is not named {PREFIX}...; it is not this service's")
            for sample in family.samples:
                extra = set(sample.labels) - AGGREGATE_LABELS
                if extra:
                    raise PersonalLabel(
                        f"metric {sample.name} has the label(s) {', '.join(sorted(extra))}; metrics carry aggregates "
                        f"only, labelled by {', '.join(sorted(AGGREGATE_LABELS))}"
                    )
            yield family


class Reading:
    """A collector whose metric families ``read()`` makes at each scrape (from a store)."""

    def __init__(self, read: Callable[[], Iterable[Metric]]):
        self._read = read

    def describe(self) -> list[Metric]:
        return []  # names are not reserved: registering must not read the store

    def collect(self) -> Iterable[Metric]:
        return self._read()


def gauge(
    name: str, documentation: str, labels: tuple[str, ...], values: Iterable[tuple[tuple[str, ...], float]]
) -> GaugeMetricFamily:
    """A gauge family ``name`` with one sample per ``(label values, value)``."""
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for label_values, value in values:
        family.add_metric(list(label_values), float(value))
    return family


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format (what the page answers)."""
    return generate_latest(registry)


class MetricsPage(ScopedPage):
    """``<prefix>metrics``: the service's registry, for a token with ``read:metrics``."""

    required_scope = METRICS_SCOPE
    needed_for = "the metrics"

    @property
    def is_api(self) -> bool:
        return True  # errors as JSON, 403 instead of a redirect to the hub's login

    async def get(self) -> None:
        body = await self.blocking(exposition, self.settings["paitient_metrics"])
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(body)


ROUTE = ("metrics", MetricsPage)
