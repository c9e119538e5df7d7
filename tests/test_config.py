"""Site configuration: the embedded default validates; every kind of mistake is named in the error."""

import os

import pytest

from paitient.config import ConfigError, check_owner, load, parse


def test_embedded_default_is_valid():
    site = load(None)
    assert site.directory.embedded
    assert [p.name for p in site.projects] == ["oncology", "cardiometabolic"]
    assert site.project("oncology").budget_for("gbsg2").epsilon == 10.0
    assert site.data_root == site.state_dir / "data"


def test_overrides_win():
    site = load(None, overrides={"workspace": {"state_dir": "/tmp/x", "port": 8123}})
    assert str(site.state_dir) == "/tmp/x" and site.workspace.port == 8123


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"wrkspace": {}}, "unknown section"),
        ({"workspace": {"prot": 1}}, r"\[workspace\] unknown key 'prot'"),
        ({"workspace": {"port": "80"}}, r"\[workspace\] port: expected a whole number"),
        ({"workspace": {"port": 70000}}, "not a usable port"),
        ({"workspace": {"bind_ip": "example"}}, "not an IP address"),
        ({"workspace": {"subdomain_host": "paitient.example.org"}}, r"does not start with https://.*give https://HOST"),
        (
            {"workspace": {"subdomain_host": "https://paitient.example.org/hub"}},
            "more than a scheme, a host and a port",
        ),
        ({"workspace": {"subdomain_host": "https://10.0.0.1"}}, "an IP address, which has no subdomains"),
        ({"workspace": {"subdomain_host": "http://paitient.example.org"}}, r"plain http .* serve it over https"),
        ({"workspace": {"subdomain_host": "https://pait_ient.example"}}, "no host of DNS labels"),
        ({"workspace": {"subdomain_host": "https://paitient.example:0x1"}}, "no usable port"),
        ({"directory": {"url": "http://x"}}, "must start with ldap://"),
        (
            {
                "directory": {
                    "url": "ldap://dc1.hospital.example",
                    "tls": "none",
                    "bind_dn_template": ["uid={username}"],
                }
            },
            "clear text",
        ),
        ({"directory": {"url": "ldap://127.0.0.1"}}, "needs bind_dn_template"),
        ({"directory": {"url": "ldap://127.0.0.1", "bind_dn_template": ["uid=x"]}}, "must contain {username}"),
        ({"projects": [{"name": "Bad Name", "group": "g"}]}, "must be lower-case"),
        ({"projects": [{"name": "a"}]}, "'group' is required"),
        ({"projects": [{"name": "a", "group": "g"}, {"name": "a", "group": "h"}]}, "repeated: a"),
        ({"projects": [{"name": "a", "group": "g", "approvals": 3}]}, "approvals: must be 1 or 2"),
        ({"projects": [{"name": "a", "group": "g", "budget": {"epsilon": -1}}]}, "epsilon: must be positive"),
        ({"projects": [{"name": "a", "group": "g", "budgets": {"x": {"epsilon": 1}}}]}, "not one of the project"),
        ({"projects": [{"name": "a", "group": "g", "auto_release": ["everything"]}]}, "unknown kind"),
        ({"accounts": {"prefix": "Root"}}, r"\[accounts\] prefix"),
        ({"accounts": {"uid_min": 60000}}, "include 65534"),
        ({"sandbox": {"memory_mb": 0}}, r"\[sandbox\] memory_mb"),
    ],
)
def test_mistakes_are_named(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse(raw)


def test_bad_toml_and_missing_file(tmp_path):
    p = tmp_path / "site.toml"
    p.write_text("[workspace\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")


def test_check_owner_refuses_readable_secret(tmp_path):
    p = tmp_path / "key"
    p.write_bytes(b"k" * 32)
    os.chmod(p, 0o644)
    with pytest.raises(ConfigError, match="readable by root only"):
        check_owner(p, secret=True)
    os.chmod(p, 0o600)
    check_owner(p, secret=True)
    os.chmod(p, 0o666)
    with pytest.raises(ConfigError, match="writable by group or others"):
        check_owner(p)


def test_example_site_configuration_loads_and_documents_every_setting():
    import re
    from pathlib import Path

    from paitient.config import SECTIONS, Project

    path = Path(__file__).resolve().parents[1] / "hub_config" / "site.example.toml"
    site = load(path)
    assert site.project("oncology").budget_for("gbsg2").epsilon == 5.0
    text = path.read_text()
    sections = {name: text.split(f"[{name}]", 1)[1].split("\n[", 1)[0] for name in SECTIONS}
    sections["projects"] = text.split("[[projects]]", 1)[1]
    for name, cls in [*SECTIONS.items(), ("projects", Project)]:
        for key in cls.settings():
            assert re.search(rf"^#? ?{key} = ", sections[name], re.M), f"[{name}] {key} is not documented"


def test_airlock_settings_come_from_the_site_and_the_command_line_wins():
    from traitlets.config import Config

    from paitient.services.airlock.service import settings_for

    site = parse({"airlock": {"min_count": 20, "mia_max_auc": 0.7}})
    assert (settings_for(site).min_count, settings_for(site).mia_max_auc) == (20, 0.7)
    cli = Config()
    cli.AirlockSettings.min_count = 5
    assert settings_for(site, cli).min_count == 5 and settings_for(site, cli).mia_max_auc == 0.7
    with pytest.raises(ConfigError, match="mia_max_auc"):
        parse({"airlock": {"mia_max_auc": 0.5}})
    with pytest.raises(ConfigError, match=r"\[airlock\] nk_k"):
        parse({"airlock": {"nk_k": 1.5}})
