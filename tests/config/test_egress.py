"""[egress]: the section's limits, a project's overrides, and the strictest limits of a user in several projects."""

import pytest

from paitient.config import EgressLimits, load, parse


def site_with(**egress):
    return parse(
        {
            "egress": egress,
            "projects": [
                {"name": "onc", "group": "g1", "egress": {"max_rows_per_output": 5, "daily_bytes": 30_000_000}},
                {"name": "card", "group": "g2", "egress": {"daily_rows": 50, "fail_closed_bytes": 0}},
                {"name": "open", "group": "g3"},
            ],
        }
    )


def test_the_defaults():
    limits = load(None).egress
    assert limits.to_dict() == {
        "max_rows_per_output": 20,
        "daily_rows": 200,
        "fail_closed_bytes": 4096,
        "unchecked_bytes": 65_536,
        "daily_bytes": 20_000_000,
        "contents_bytes": 2_000_000,
    }
    assert load(None).egress_for("oncology") == limits


def test_a_project_override_wins_key_by_key_over_the_section():
    site = site_with(daily_rows=100, contents_bytes=1_000_000)
    onc = site.egress_for("onc")
    assert isinstance(onc, EgressLimits)
    assert (onc.max_rows_per_output, onc.daily_bytes) == (5, 30_000_000)  # the project's own
    assert (onc.daily_rows, onc.contents_bytes, onc.fail_closed_bytes) == (100, 1_000_000, 4096)  # the section's
    assert site.egress_for("open") == site.egress
    assert dict(site.project("onc").egress) == {"max_rows_per_output": 5, "daily_bytes": 30_000_000}


def test_a_user_in_several_projects_gets_the_strictest_of_each_limit():
    site = site_with(daily_rows=100)
    both = site.egress_for_user(["onc", "card"])
    assert both.to_dict() == {
        "max_rows_per_output": 5,  # onc
        "daily_rows": 50,  # card
        "fail_closed_bytes": 0,  # card
        "unchecked_bytes": 65_536,
        "daily_bytes": 20_000_000,  # card has the section's, onc allows more
        "contents_bytes": 2_000_000,
    }
    assert site.egress_for_user(["onc"]) == site.egress_for("onc")
    assert site.egress_for_user([]) == site.egress
    assert site.egress_for_user(["gone", "card"]) == site.egress_for("card")  # projects no longer listed: left out


def test_unknown_project_names_the_known_ones():
    with pytest.raises(KeyError, match=r"no project 'nope' in the site configuration \(projects: onc, card, open\)"):
        site_with().egress_for("nope")
