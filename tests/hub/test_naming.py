"""Account names derived from directory usernames: safe characters, collisions, existing accounts."""

import pwd

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paitient.hub.naming import (
    ACCOUNT_RE,
    NamingError,
    account_name,
    registry_owner,
    sanitise,
    system_account_exists,
)
from paitient.registry import Member, Registry


def nobody_exists(name: str) -> bool:
    return False


def no_owner(name: str) -> str | None:
    return None


def test_plain_name_for_simple_username():
    assert account_name("alice", "pt-", exists=nobody_exists, owner=no_owner) == "pt-alice"


@pytest.mark.parametrize(
    ("username", "expected"),
    [("alice.adler", "pt-alice-adler"), ("a_b@hospital.example", "pt-a-b-hospital-example"), ("-x-", "pt-x")],
)
def test_odd_characters_become_dashes(username, expected):
    assert account_name(username, "pt-", exists=nobody_exists, owner=no_owner) == expected


def test_collision_between_two_directory_names_is_resolved_deterministically():
    registry = {"pt-a-b": "a.b"}

    def owner(name):
        return registry.get(name)

    first = account_name("a.b", "pt-", exists=nobody_exists, owner=owner)
    second = account_name("a-b", "pt-", exists=nobody_exists, owner=owner)
    assert first == "pt-a-b"
    assert second.startswith("pt-a-b-") and len(second) == len("pt-a-b-") + 6
    assert second == account_name("a-b", "pt-", exists=nobody_exists, owner=owner)


def test_existing_system_account_outside_registry_is_never_reused():
    taken = {"pt-alice"}
    name = account_name("alice", "pt-", exists=lambda n: n in taken, owner=no_owner)
    assert name != "pt-alice" and name.startswith("pt-alice-")


def test_real_system_accounts_are_detected_and_skipped():
    assert system_account_exists("root")
    assert not system_account_exists("pt-surely-nobody-has-this-0")
    # a prefix that turns a directory user "oot" into the machine's real "root" account
    name = account_name("oot", "r", exists=system_account_exists, owner=no_owner)
    assert name != "root"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)


def test_registry_owned_account_is_reused_even_though_it_exists():
    name = account_name("alice", "pt-", exists=lambda n: True, owner=lambda n: "alice")
    assert name == "pt-alice"


def test_account_of_another_paitient_user_is_not_shared():
    def owner(n):
        return "mallory" if n == "pt-alice" else None

    name = account_name("alice", "pt-", exists=nobody_exists, owner=owner)
    assert name != "pt-alice"


@pytest.mark.parametrize(("prefix", "username", "reserved"), [("r", "oot", "root"), ("n", "obody", "nobody")])
def test_reserved_names_never_handed_out(prefix, username, reserved):
    # nothing exists and nobody owns anything: only the reserved list stands in the way
    name = account_name(username, prefix, exists=nobody_exists, owner=no_owner)
    assert name != reserved and name.startswith(reserved + "-")


def test_empty_prefix_is_refused():
    with pytest.raises(NamingError, match="prefix"):
        account_name("alice", "", exists=nobody_exists, owner=no_owner)


def test_long_names_are_cut_with_a_hash_and_stay_distinct():
    a = "x" * 40 + "a"
    b = "x" * 40 + "b"
    na = account_name(a, "pt-", exists=nobody_exists, owner=no_owner)
    nb = account_name(b, "pt-", exists=nobody_exists, owner=no_owner)
    assert len(na) <= 32 and len(nb) <= 32
    assert na != nb


def test_name_without_any_safe_character_gets_a_hash_name():
    assert account_name("...", "pt-", exists=nobody_exists, owner=no_owner) == account_name(
        "...", "pt-", exists=nobody_exists, owner=no_owner
    )
    assert ACCOUNT_RE.match(account_name("...", "pt-", exists=nobody_exists, owner=no_owner))


def test_all_candidates_taken_is_a_clear_error():
    with pytest.raises(NamingError, match="no free account name"):
        account_name("alice", "pt-", exists=lambda n: True, owner=no_owner)


def test_registry_owner_reads_the_real_registry(tmp_path):
    registry = Registry(tmp_path / "accounts.json")
    registry.put(Member(username="alice", account="pt-alice", uid=20001))
    owner = registry_owner(registry)
    assert owner("pt-alice") == "alice"
    assert owner("pt-bob") is None
    assert account_name("alice", "pt-", exists=lambda n: True, owner=owner) == "pt-alice"
    assert account_name("alice2", "pt-", exists=nobody_exists, owner=owner) == "pt-alice2"


@given(st.text(min_size=1, max_size=80))
def test_any_username_gives_a_valid_account_name(username):
    name = account_name(username, "pt-", exists=nobody_exists, owner=no_owner)
    assert ACCOUNT_RE.match(name), name
    assert len(name) <= 32
    assert name.startswith("pt-")
    assert set(sanitise(username)) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_distinct_usernames_never_share_an_account_when_registered(u1, u2):
    if u1 == u2:
        return
    registry: dict[str, str] = {}
    for u in (u1, u2):
        registry[account_name(u, "pt-", exists=nobody_exists, owner=registry.get)] = u
    assert len(registry) == 2
