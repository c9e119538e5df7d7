"""The ledger's metrics: per project and dataset the privacy budget spent, reserved and left; runs by state.

Read from the ledger at each scrape (so they survive a restart, and agree with ``paitient ledger show`` and
the stewards' page): the same sums over every researcher of a project, labelled by project and dataset only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.metrics_core import Metric

from paitient.services.kit.metrics import MetricsRegistry, Reading, gauge
from paitient.services.ledger.store import Ledger

RUN_STATES = ("reserved", "settled", "lost")
BUDGET_FIELDS = (
    ("epsilon_total", "The dataset's epsilon budget"),
    ("epsilon_spent", "Epsilon spent by settled and lost runs"),
    ("epsilon_reserved", "Epsilon held by open reservations"),
    ("epsilon_left", "Epsilon left to reserve"),
    ("delta_spent", "Delta spent by settled and lost runs"),
)


def read_ledger(site: Any, ledger: Ledger) -> Iterator[Metric]:
    """The budgets of every project of the site, and the runs per project and state."""
    rows = [row for project in site.projects for row in ledger.budget(project.name)]
    for field, text in BUDGET_FIELDS:
        yield gauge(
            f"paitient_ledger_{field}",
            text,
            ("project", "dataset"),
            [((row["project"], row["dataset"]), row[field]) for row in rows],
        )
    counts = ledger.run_counts()
    yield gauge(
        "paitient_ledger_runs",
        "Runs (budget reservations) by state: reserved (open), settled, lost (ended unsettled, counted in full)",
        ("project", "state"),
        [((p.name, state), counts.get((p.name, state), 0)) for p in site.projects for state in RUN_STATES],
    )
    yield gauge(
        "paitient_ledger_records_waiting",
        "Audit records the trail has not taken yet, held in the ledger's database; no budget is reserved while "
        "any waits",
        (),
        [((), ledger.held.count())],
    )


def ledger_registry(site: Any, ledger: Ledger) -> MetricsRegistry:
    """The ledger service's registry."""
    registry = MetricsRegistry()
    registry.register(Reading(lambda: read_ledger(site, ledger)))
    return registry
