"""Who may read the metrics: the operator's metrics token (and JupyterHub's admins), never a researcher or a
steward; /hub/metrics and every service's /metrics ask for the same scope."""

import os
import stat
import tomllib

from jupyterhub import orm, scopes
from traitlets.config import Config

from paitient.config import EMBEDDED_SITE, parse
from paitient.hub import signon
from paitient.hub.hubconfig import METRICS_SERVICE, RESEARCHER_SCOPES, STEWARD_SCOPES, configure
from paitient.services.kit.metrics import METRICS_SCOPE, MetricsPage


def hub_config(tmp_path) -> Config:
    raw = tomllib.loads(EMBEDDED_SITE.read_text())
    raw["workspace"]["state_dir"] = str(tmp_path / "state")
    (tmp_path / "state" / "hub").mkdir(parents=True)
    return configure(Config(), parse(raw), directory_url="ldap://127.0.0.1:3890/", hub_port=1, proxy_api_port=2)


def bases(scope_list, name="alice") -> set[str]:
    custom = {s for s in scope_list if s.startswith("custom:")}
    rest = frozenset(set(scope_list) - custom)
    return {s.split("!", 1)[0] for s in scopes.expand_scopes(rest, owner=orm.User(name=name))} | custom


def test_the_metrics_token_is_a_service_of_its_own_with_read_metrics_only(tmp_path):
    c = hub_config(tmp_path)
    services = {s["name"]: s for s in c.JupyterHub.services}
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    token_file = tmp_path / "state" / "hub" / "metrics_token"
    assert services[METRICS_SERVICE]["api_token"] == token_file.read_text().strip()
    st = os.stat(token_file)
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    assert "command" not in services[METRICS_SERVICE]  # a token for a scraper outside; nothing the hub runs
    assert roles[METRICS_SERVICE]["scopes"] == [METRICS_SCOPE] and roles[METRICS_SERVICE]["services"] == [
        METRICS_SERVICE
    ]
    # no other role carries the scope, and the operator's own token is a different one
    assert [name for name, r in roles.items() if METRICS_SCOPE in r["scopes"]] == [METRICS_SERVICE]
    assert services["paitient-operator"]["api_token"] != services[METRICS_SERVICE]["api_token"]
    assert c.JupyterHub.authenticate_prometheus is True
    assert MetricsPage.required_scope == METRICS_SCOPE  # the services ask what /hub/metrics asks


def test_no_researcher_or_steward_role_can_read_metrics():
    specs = signon.role_specs(STEWARD_SCOPES, RESEARCHER_SCOPES)
    for held in (RESEARCHER_SCOPES, STEWARD_SCOPES, signon.OWN_SCOPES, *(s["scopes"] for s in specs.values())):
        assert METRICS_SCOPE not in bases(held), held


def test_every_service_with_metrics_is_reached_through_the_proxy(tmp_path):
    c = hub_config(tmp_path)
    services = {s["name"]: s for s in c.JupyterHub.services}
    for name in ("ledger", "audit", "airlock", "egress", "jobs"):
        assert services[name]["url"].startswith("http://127.0.0.1:"), name
