"""The services' metrics: aggregates only, and only for a token with read:metrics (the operator's, an admin's).

Every service's page is tested here with the scopes the hub gives each role: a researcher's and a steward's
are refused with 403 (no redirect to a login, no number in the answer), the operator's metrics token and
JupyterHub's admins read them.
"""

from __future__ import annotations

import json

import pytest
from jupyterhub import orm, roles, scopes
from prometheus_client import Counter, Gauge

from paitient.config import parse
from paitient.hub.hubconfig import RESEARCHER_SCOPES, STEWARD_SCOPES
from paitient.services.kit import metrics, pages
from paitient.services.kit.metrics import METRICS_SCOPE, MetricsRegistry, PersonalLabel, Reading, gauge
from tests.scrape import Served, header_auth, samples, text


def expanded(scope_list, name: str) -> list[str]:
    """The scopes a user's token carries, as the hub expands them; custom scopes stand for themselves."""
    custom = {s for s in scope_list if s.startswith("custom:")}
    rest = frozenset(set(scope_list) - custom)
    return sorted(set(scopes.expand_scopes(rest, owner=orm.User(name=name))) | custom)


def admin_scopes() -> list[str]:
    (admin,) = [r for r in roles.get_default_roles() if r["name"] == "admin"]
    return admin["scopes"]


RESEARCHER = expanded(RESEARCHER_SCOPES, "alice")
STEWARD = expanded(STEWARD_SCOPES, "sam")


# -- the registry: aggregates of paitient only ------------------------------------------------------------


def test_a_label_that_could_name_a_person_stops_the_whole_answer():
    registry = MetricsRegistry()
    Gauge("paitient_fine", "an aggregate", ["project"], registry=registry).labels("oncology").set(3)
    per_user = Counter("paitient_outputs", "per user", ["user"], registry=registry)
    per_user.labels("alice").inc()
    with pytest.raises(PersonalLabel, match="paitient_outputs_total has the label\\(s\\) user"):
        text(registry)


@pytest.mark.parametrize("label", ["username", "account", "uid", "request_id", "job_id", "reservation"])
def test_only_the_listed_labels_pass(label):
    registry = MetricsRegistry()
    registry.register(Reading(lambda: [gauge("paitient_x", "x", (label,), [(("v",), 1)])]))
    with pytest.raises(PersonalLabel, match=label):
        text(registry)


def test_metrics_not_named_paitient_are_refused():
    registry = MetricsRegistry()
    Gauge("process_open_fds", "a library's", registry=registry).set(3)
    with pytest.raises(PersonalLabel, match="process_open_fds"):
        text(registry)


def test_aggregates_pass_and_readings_are_read_at_each_scrape():
    registry = MetricsRegistry()
    state = {"n": 1}
    registry.register(Reading(lambda: [gauge("paitient_n", "n", ("project",), [(("oncology",), state["n"])])]))
    assert samples(registry)[("paitient_n", frozenset({("project", "oncology")}))] == 1
    state["n"] = 5
    assert samples(registry)[("paitient_n", frozenset({("project", "oncology")}))] == 5


# -- the page, in the kit ---------------------------------------------------------------------------------

PREFIX = "/services/ledger/"


@pytest.fixture
async def page():
    registry = MetricsRegistry()
    Gauge("paitient_answer", "the answer", registry=registry).set(42)
    app = pages.make_app(
        [metrics.ROUTE], service="ledger", prefix=PREFIX, hub_auth=header_auth(PREFIX), paitient_metrics=registry
    )
    served = Served(app, PREFIX)
    yield served, registry
    served.close()


async def test_the_metrics_token_reads_the_text_format(page):
    served, _ = page
    r = await served.get("metrics", scopes=[METRICS_SCOPE])
    assert r.code == 200 and r.headers["Content-Type"].startswith("text/plain; version=")
    assert "paitient_answer 42.0" in r.body.decode()


@pytest.mark.parametrize(("who", "held"), [("alice", RESEARCHER), ("sam", STEWARD), ("nobody", [])])
async def test_researchers_and_stewards_are_refused_without_a_number(page, who, held):
    served, _ = page
    r = await served.get("metrics", user=who, scopes=held)
    assert r.code == 403 and "paitient_answer" not in r.body.decode()
    assert json.loads(r.body)["status"] == 403


async def test_anonymous_is_refused_not_sent_to_a_login(page):
    served, _ = page
    r = await served.get("metrics", user=None)
    assert r.code == 403 and "Location" not in r.headers
    assert "read:metrics" in json.loads(r.body)["error"]


async def test_jupyterhubs_admins_read_them(page):
    served, _ = page
    assert METRICS_SCOPE in admin_scopes()
    assert (await served.get("metrics", user="ada", scopes=admin_scopes())).code == 200


async def test_a_registry_that_would_leak_answers_500_with_nothing_of_it(page):
    served, registry = page
    Counter("paitient_leaky", "per user", ["user"], registry=registry).labels("alice").inc()
    r = await served.get("metrics", scopes=[METRICS_SCOPE])
    assert r.code == 500 and "alice" not in r.body.decode() and "paitient_answer" not in r.body.decode()


# -- every service's page ------------------------------------------------------------------------------------


@pytest.fixture
def site(world_tmp):
    state = world_tmp / "state"
    state.mkdir(mode=0o755)
    return parse(
        {
            "workspace": {"state_dir": str(state)},
            "projects": [{"name": "oncology", "group": "oncology", "datasets": ["breast_cancer"], "stewards": ["sam"]}],
        }
    )


def service_app(name: str, site, auth):
    prefix = f"/services/{name}/"
    if name == "ledger":
        from paitient.services.ledger.store import Ledger
        from paitient.services.ledger.web import make_app

        return make_app(site, Ledger(site), prefix, hub_auth=auth), "paitient_ledger_epsilon_spent"
    if name == "egress":
        from paitient.services.egress.store import EgressStore
        from paitient.services.egress.web import make_app

        return make_app(site, EgressStore.for_site(site), prefix, hub_auth=auth), "paitient_egress_today_bytes"
    if name == "audit":
        from paitient.services.audit.web import make_app

        return make_app(site, prefix, hub_auth=auth), "paitient_audit_records"
    if name == "airlock":
        from paitient.services.airlock.core import Airlock
        from paitient.services.airlock.web import make_app

        return make_app(Airlock(site), prefix=prefix, hub_auth=auth), "paitient_airlock_requests"
    from paitient.services.jobs.store import JobStore
    from paitient.services.jobs.web import make_app

    return make_app(site, JobStore(site.state_dir), prefix, hub_auth=auth), "paitient_jobs"


@pytest.mark.parametrize("name", ["ledger", "egress", "audit", "airlock", "jobs"])
async def test_each_services_metrics_need_read_metrics(site, name):
    prefix = f"/services/{name}/"
    app, metric = service_app(name, site, header_auth(prefix))
    served = Served(app, prefix)
    try:
        r = await served.get("metrics", scopes=[METRICS_SCOPE])
        assert r.code == 200 and f"# TYPE {metric} gauge" in r.body.decode()
        # a steward holds every scope of the services' own pages, and still reads no metric
        for who, held in (("alice", RESEARCHER), ("sam", STEWARD)):
            r = await served.get("metrics", user=who, scopes=held)
            assert r.code == 403 and "paitient_" not in r.body.decode(), (who, r.body)
        assert (await served.get("metrics", user=None)).code == 403
    finally:
        served.close()
