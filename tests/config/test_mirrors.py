"""Traits that carry a site setting into another process are made from the site's one declaration."""

import pytest
from traitlets import Int, TraitError

from paitient.config import Airlock, EgressLimits, Model, Sandbox, Server, parse, site_trait
from paitient.hub.serverconfig import server_config
from paitient.registry import Member
from paitient.server.app import PaitientServerExtension
from paitient.server.contents import ConfinedContentsManager
from paitient.server.provisioner import SandboxProvisioner
from paitient.server.websocket import CappedWebsocketConnection
from paitient.services.airlock.service import settings_for
from paitient.services.airlock.settings import AirlockSettings

# (class, its trait) -> (site section, setting); every trait of these classes that holds a site setting
MIRRORS = {
    (CappedWebsocketConnection, "output_cap_message_bytes"): (Server, "output_cap_message_bytes"),
    (CappedWebsocketConnection, "output_cap_execution_bytes"): (Server, "output_cap_execution_bytes"),
    (ConfinedContentsManager, "max_content_bytes"): (Server, "contents_cap_bytes"),
    (ConfinedContentsManager, "max_text_bytes"): (EgressLimits, "contents_bytes"),
    (PaitientServerExtension, "fail_closed_bytes"): (EgressLimits, "fail_closed_bytes"),
    (PaitientServerExtension, "unchecked_bytes"): (EgressLimits, "unchecked_bytes"),
    (SandboxProvisioner, "memory_mb"): (Sandbox, "memory_mb"),
    (SandboxProvisioner, "max_processes"): (Sandbox, "max_processes"),
    (SandboxProvisioner, "max_open_files"): (Sandbox, "max_open_files"),
    (SandboxProvisioner, "cpu_seconds"): (Sandbox, "cpu_seconds"),
    (SandboxProvisioner, "tmp_bytes"): (Sandbox, "tmp_bytes"),
    **{(AirlockSettings, name): (Airlock, name) for name in Airlock.settings()},
}


def test_the_list_above_is_every_mirrored_trait():
    found = {
        (cls, name)
        for cls in (
            CappedWebsocketConnection,
            ConfinedContentsManager,
            SandboxProvisioner,
            AirlockSettings,
            PaitientServerExtension,
        )
        for name, trait in cls.class_traits().items()
        if trait.metadata.get("site_setting")
    }
    assert found == set(MIRRORS)


@pytest.mark.parametrize("mirror, source", MIRRORS.items(), ids=lambda m: f"{m[0].__name__}.{m[1]}")
def test_a_mirrored_trait_has_the_site_settings_type_default_and_help(mirror, source):
    trait = mirror[0].class_traits()[mirror[1]]
    site_trait = source[0].settings()[source[1]]
    assert type(trait) is type(site_trait)
    assert trait.default() == site_trait.default()
    assert trait.help.startswith(site_trait.help)
    assert trait.help.endswith(f"Site setting [{source[0].section}] {source[1]}.")
    assert trait.metadata["config"] is True and trait.metadata["site_setting"] == f"[{source[0].section}] {source[1]}"
    assert site_trait.metadata.get("site_setting") is None  # the declaration itself is untouched


def test_a_mirrored_trait_applies_the_site_rule():
    with pytest.raises(TraitError, match=r"must lie in \(0, 1\], got 1.5"):
        AirlockSettings(nk_k=1.5)
    with pytest.raises(TraitError, match="must be a positive whole number, got 0"):
        CappedWebsocketConnection.class_traits()["output_cap_message_bytes"].validate(None, 0)
    with pytest.raises(TraitError, match="expected a whole number, got '12'"):
        SandboxProvisioner(memory_mb="12")
    assert SandboxProvisioner(memory_mb=512).memory_mb == 512


def test_only_a_setting_of_a_site_type_can_be_mirrored():
    # a plain traitlets type would not run the mirrored setting's rule: the mirror would accept what the site refuses
    class Odd(Model):
        section = "odd"
        size = Int(1, help="A size.").tag(config=True)

    with pytest.raises(
        TypeError, match=r"\[odd\] size has the type Int, .*; declare it with a type from paitient.config.traits"
    ):
        site_trait(Odd, "size")


def test_the_user_servers_config_carries_every_server_side_mirror_from_the_site(tmp_path):
    site = parse(
        {
            "workspace": {"state_dir": str(tmp_path)},
            "sandbox": {
                "memory_mb": 1000,
                "max_processes": 99,
                "max_open_files": 77,
                "cpu_seconds": 66,
                "tmp_bytes": 5 << 20,
            },
            "server": {"output_cap_message_bytes": 11, "output_cap_execution_bytes": 22, "contents_cap_bytes": 33},
        }
    )
    member = Member(username="alice", account="root", uid=0, projects=())
    cfg = server_config(site, member, "/home/pt-alice", str(tmp_path / "data"), str(tmp_path / "state"))
    for (cls, name), (section, setting) in MIRRORS.items():
        if cls is AirlockSettings:
            continue
        assert cfg[cls.__name__][name] == getattr(getattr(site, section.section), setting), (cls, name)


def test_the_airlock_takes_every_airlock_setting_from_the_site():
    site = parse({"airlock": {"min_count": 20, "nk_n": 3, "zeros_disclosive": False, "audit_account": "pt-mia"}})
    settings = settings_for(site)
    assert {name: getattr(settings, name) for name in Airlock.settings()} == site.airlock.to_dict()
