"""``[workspace] subdomain_host``: the hub, the proxy, the services' links and a separately run service's
sign-in all name the same origins, the ones JupyterHub itself gives. The browser's side of it (a page on a
researcher's origin cannot reach the stewards' pages) is tests/e2e/test_origins.py."""

from __future__ import annotations

import tomllib
from urllib.parse import urlsplit

import pytest
from jupyterhub.utils import subdomain_hook_idna
from traitlets.config import Config

from paitient.config import EMBEDDED_SITE, parse
from paitient.config.workspace import service_origin
from paitient.hub.hubconfig import configure
from paitient.ops.commands import proxy_command
from paitient.services import PAGES, SERVICES
from paitient.services.kit.process import separate_service_env
from paitient.services.kit.render import nav_links

HOST = "https://paitient.example.org:8443"


def site(tmp_path, subdomain_host: str = ""):
    raw = tomllib.loads(EMBEDDED_SITE.read_text())
    raw["workspace"]["state_dir"] = str(tmp_path / "state")
    if subdomain_host:
        raw["workspace"]["subdomain_host"] = subdomain_host
    (tmp_path / "state" / "hub").mkdir(parents=True, exist_ok=True)
    return parse(raw)


@pytest.mark.parametrize("subdomain_host", ["", HOST])
def test_the_hub_and_the_proxy_route_by_host_exactly_when_the_site_sets_subdomains(tmp_path, subdomain_host):
    s = site(tmp_path, subdomain_host)
    c = configure(Config(), s, directory_url="ldap://127.0.0.1:3890/", hub_port=1, proxy_api_port=2)
    argv = proxy_command(s, "chp", hub_port=1, proxy_api_port=2).argv
    if subdomain_host:
        assert c.JupyterHub.subdomain_host == HOST
        assert argv.count("--host-routing") == 1
    else:
        assert "subdomain_host" not in c.JupyterHub
        assert "--host-routing" not in argv


def test_a_trailing_slash_is_dropped_and_the_origin_kept(tmp_path):
    assert site(tmp_path, HOST + "/").workspace.subdomain_host == HOST


@pytest.mark.parametrize("name", sorted(set(PAGES) | set(SERVICES)))
def test_each_services_origin_is_the_one_jupyterhub_gives_it(name):
    parsed = urlsplit(HOST)
    expected = f"{parsed.scheme}://{subdomain_hook_idna(name, parsed.hostname, 'service')}:{parsed.port}"
    assert service_origin(HOST, name) == expected
    assert service_origin("", name) == ""


def test_the_services_header_links_every_other_origin_in_full():
    links = {link["title"]: link for link in nav_links("/services/ledger/", "ledger", "/hub/", HOST)}
    assert links[PAGES["ledger"]] == {"title": PAGES["ledger"], "href": "/services/ledger/", "current": True}
    assert links[PAGES["airlock"]]["href"] == "https://airlock--service.paitient.example.org:8443/services/airlock/"
    assert links["Hub"]["href"] == HOST + "/hub/home"
    one_origin = {link["title"]: link["href"] for link in nav_links("/services/ledger/", "ledger", "/hub/")}
    assert one_origin[PAGES["airlock"]] == "/services/airlock/" and one_origin["Hub"] == "/hub/home"


def test_a_separately_run_service_signs_in_to_the_hubs_origin_and_comes_back_to_its_own():
    entry = {"name": "airlock", "url": "http://127.0.0.1:9000"}
    env = separate_service_env(entry, "token", 8081, subdomain_host=HOST)
    assert env["JUPYTERHUB_HOST"] == HOST
    assert env["JUPYTERHUB_OAUTH_CALLBACK_URL"] == (
        "https://airlock--service.paitient.example.org:8443/services/airlock/oauth_callback"
    )
    plain = separate_service_env(entry, "token", 8081)
    assert (
        plain["JUPYTERHUB_HOST"] == "" and plain["JUPYTERHUB_OAUTH_CALLBACK_URL"] == "/services/airlock/oauth_callback"
    )


def test_the_config_file_for_jupyterhubs_own_hub_refuses_subdomains_it_cannot_guard(tmp_path, monkeypatch):
    """Run by stock ``jupyterhub -f hub_config/jupyterhub_config.py``, the hub has no host rule (only
    ``paitient up``'s hub class installs it), and a review found subdomains open to the attack of 17b again:
    a steward signing in on alice's host. The file refuses the setting, saying what to do; without it, it
    configures the hub."""
    from pathlib import Path

    from traitlets.config.loader import PyFileConfigLoader

    from paitient.config.reference import effective_toml

    config_file = Path(__file__).parents[2] / "hub_config" / "jupyterhub_config.py"
    for subdomain_host in (HOST, ""):
        s = site(tmp_path, subdomain_host).replace(
            directory=site(tmp_path).directory.replace(url="ldap://127.0.0.1:3890/")
        )
        site_file = tmp_path / "site.toml"
        site_file.write_text(effective_toml(s))
        monkeypatch.setenv("PAITIENT_SITE", str(site_file))
        loader = PyFileConfigLoader(config_file.name, str(config_file.parent))
        if subdomain_host:
            with pytest.raises(SystemExit, match="cannot serve \\[workspace\\] subdomain_host.*paitient up"):
                loader.load_config()
        else:
            assert loader.load_config().JupyterHub.allow_named_servers is False
