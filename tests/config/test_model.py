"""The settings model: one declaration per setting, frozen after load, plain data out, rules next to settings."""

import dataclasses
import json
import math
import tomllib

import pytest
from traitlets import All, Bunch, TraitError, validate

from paitient.config import (
    SECTIONS,
    Budget,
    ConfigError,
    Model,
    Project,
    SettingError,
    Workspace,
    load,
    parse,
)
from paitient.config.reference import effective_toml
from paitient.config.traits import WholeNumber

MODELS = [*SECTIONS.values(), Project, Budget]


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_every_setting_has_help_a_config_tag_and_a_default_its_rule_accepts(cls):
    assert cls.settings(), f"{cls.__name__} declares no settings"
    for name, trait in cls.settings().items():
        assert trait.metadata.get("config") is True, name
        assert len(trait.help) > 10, f"{cls.__name__}.{name} has no help text"
        if cls is not Project or name not in ("name", "group"):  # required: no default to accept
            default = trait.default()
            assert cls.apply_rule(name, default) == default, name


def test_the_loaded_site_is_frozen_all_the_way_down():
    site = load(None)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot change after it is loaded"):
        site.workspace.state_dir = "/tmp/elsewhere"
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.workspace.set_trait("port", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.server = site.server
    project = site.project("oncology")
    with pytest.raises(dataclasses.FrozenInstanceError):
        project.budget.epsilon = 1000.0
    with pytest.raises(TypeError):
        project.budgets["breast_cancer"] = Budget(1000.0, 0.5)  # a read-only mapping
    assert isinstance(project.datasets, tuple) and isinstance(site.projects, tuple)
    assert site.workspace.state_dir == "/var/lib/paitient" and project.budget.epsilon == 10.0


def test_replace_gives_a_validated_copy_and_leaves_the_original():
    site = load(None)
    strict = site.replace(workspace=site.workspace.replace(min_k=11))
    assert (strict.workspace.min_k, site.workspace.min_k) == (11, 5)
    with pytest.raises(ConfigError, match="min_k: must be at least 1, got 0"):
        site.workspace.replace(min_k=0)
    with pytest.raises(ConfigError, match="'none' sends passwords in clear text"):
        site.directory.replace(url="ldap://dc1.hospital.example/", tls="none")


def test_to_dict_is_plain_json_and_the_effective_toml_loads_back_equal(tmp_path):
    site = parse(
        {
            "workspace": {"state_dir": "/srv/pt"},
            "egress": {"daily_rows": 50},
            "projects": [
                {
                    "name": "onc",
                    "group": "g",
                    "datasets": ["bc", "gbsg"],
                    "budgets": {"gbsg": {"epsilon": 2.5}},
                    "egress": {"max_rows_per_output": 5},
                }
            ],
        }
    )
    data = site.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["projects"][0]["budgets"] == {"gbsg": {"epsilon": 2.5, "delta": 1e-5}}
    assert data["projects"][0]["egress"] == {"max_rows_per_output": 5}
    assert data["egress"]["daily_rows"] == 50 and data["source"] == ""
    again = parse(tomllib.loads(effective_toml(site)))
    assert again == site and again.to_dict() == data


def test_budget_keeps_its_positional_form_and_value_equality():
    assert Budget(3.0, 1e-6) == Budget(epsilon=3.0, delta=1e-6)
    assert Budget(3.0, 1e-6) != Budget(3.0, 1e-5)
    assert len({Budget(3.0, 1e-6), Budget(epsilon=3.0, delta=1e-6)}) == 1
    with pytest.raises(SettingError, match="epsilon: must be positive and finite, got inf"):
        Budget(math.inf)
    with pytest.raises(TypeError, match="'epsilon' twice"):
        Budget(1.0, epsilon=2.0)


def test_a_setting_with_two_rules_is_refused_when_the_class_is_made():
    # traitlets keeps one @validate per trait; a second one would silently replace the first
    with pytest.raises(TypeError, match="Broken.size is checked by both _one and _two"):

        class Broken(Model):
            size = WholeNumber(1, help="A size.").tag(config=True)

            @validate("size")
            def _one(self, proposal: Bunch) -> int:
                return proposal.value

            @validate("size")
            def _two(self, proposal: Bunch) -> int:
                return proposal.value


def test_a_rule_for_all_settings_is_refused_when_the_class_is_made():
    # traitlets files @validate(All) under its sentinel and never calls it: the rule would silently not run
    with pytest.raises(TypeError, match="Broken._every is @validate\\(All\\), which never runs; name the settings"):

        class Broken(Model):
            size = WholeNumber(1, help="A size.").tag(config=True)

            @validate(All)
            def _every(self, proposal: Bunch) -> int:
                return proposal.value


def test_a_model_object_checks_each_value_when_made_directly():
    with pytest.raises(SettingError) as e:
        Workspace(port=70000)
    assert (e.value.key, e.value.message) == ("port", "not a usable port: 70000 (allowed: 1 to 65535)")
    with pytest.raises(SettingError, match="unknown key 'prot'"):
        Workspace(prot=1)
    with pytest.raises(TraitError, match="must be a positive whole number"):
        SECTIONS["server"].apply_rule("output_cap_message_bytes", 0)


def test_copies_are_the_object_and_a_pickle_loads_back_equal():
    import copy
    import pickle

    site = load(None)
    assert copy.deepcopy(site) is site and copy.copy(site.project("oncology")) is site.project("oncology")
    again = pickle.loads(pickle.dumps(site))  # noqa: S301 - our own bytes
    assert again == site and again.project("oncology").budget_for("gbsg2") == Budget(10.0, 1e-5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        again.workspace.port = 1


def test_the_time_zone_is_one_the_zone_database_knows():
    assert load(None, overrides={"workspace": {"time_zone": "Europe/Berlin"}}).workspace.time_zone == "Europe/Berlin"
    with pytest.raises(ConfigError, match=r"time_zone: must name a time zone of the IANA database.*got 'Mars/Olympus'"):
        load(None, overrides={"workspace": {"time_zone": "Mars/Olympus"}})
