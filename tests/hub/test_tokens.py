"""Researchers hold no token scope; stewards do; where each lands after signing in."""

import pytest
from jupyterhub import orm, scopes
from traitlets.config import Config

from paitient.hub import landing, signon, tokens
from paitient.hub.hubconfig import OPERATOR_SERVICE, RESEARCHER_SCOPES, STEWARD_SCOPES, configure

TOKEN_SCOPES = {"tokens", "read:tokens"}


def expanded(scope_list, name="alice") -> set[str]:
    """JupyterHub's expansion for user ``name``; the services' custom scopes (defined by the running hub,
    each standing for itself alone) are passed through as they are."""
    custom = {s for s in scope_list if s.startswith("custom:")}
    rest = frozenset(set(scope_list) - custom)
    return set(scopes.expand_scopes(rest, owner=orm.User(name=name))) | custom


def bases(scope_set: set[str]) -> set[str]:
    return {s.split("!", 1)[0] for s in scope_set}


def test_own_scopes_are_jupyterhubs_self_less_the_token_scopes():
    own = expanded(signon.OWN_SCOPES)
    self_ = expanded(["self"])
    assert TOKEN_SCOPES <= bases(self_)  # why `self` cannot be used for researchers
    assert own == {s for s in self_ if s.split("!", 1)[0] not in TOKEN_SCOPES}
    assert all(s.endswith("!user=alice") for s in own)  # over their own account only


def test_researcher_roles_carry_no_token_scope_and_the_stewards_do():
    assert not bases(expanded(RESEARCHER_SCOPES)) & TOKEN_SCOPES
    assert not bases(expanded(signon.BASE_RESEARCHER_SCOPES)) & TOKEN_SCOPES
    specs = signon.role_specs(STEWARD_SCOPES, RESEARCHER_SCOPES)
    assert not bases(expanded(specs["researcher"]["scopes"])) & TOKEN_SCOPES
    assert "tokens!user=sam" in expanded(specs["steward"]["scopes"], "sam")


def test_no_role_of_a_researcher_or_steward_reads_other_accounts_or_groups_through_the_hub():
    """A steward held list:users, read:users:name and read:groups over everyone: any project's member list
    (GET /hub/api/groups/<project>), where the services show a steward their own projects' alone."""
    specs = signon.role_specs(STEWARD_SCOPES, RESEARCHER_SCOPES)
    for role, name in (("steward", "sam"), ("researcher", "alice")):
        held = expanded(specs[role]["scopes"], name)
        over_others = {s for s in held if "!" not in s and not s.startswith(("access:services", "custom:"))}
        assert over_others == set(), (role, over_others)
        assert not {"list:users", "list:groups", "read:groups", "read:users:name"} & held


def test_hub_configuration_gives_the_user_role_no_token_scope_and_installs_the_pages(tmp_path):
    import tomllib

    from paitient.config import EMBEDDED_SITE, parse

    raw = tomllib.loads(EMBEDDED_SITE.read_text())
    raw["workspace"]["state_dir"] = str(tmp_path / "state")
    (tmp_path / "state" / "hub").mkdir(parents=True)
    c = configure(Config(), parse(raw), directory_url="ldap://127.0.0.1:3890/", hub_port=1, proxy_api_port=2)
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert roles["user"]["scopes"] == list(signon.OWN_SCOPES)
    assert OPERATOR_SERVICE in roles["paitient-operator"]["services"]
    assert c.JupyterHub.default_url is landing.default_url and c.JupyterHub.implicit_spawn_seconds > 0
    assert (tokens.TEMPLATES / "page.html").is_file() and c.JupyterHub.template_paths == [str(tokens.TEMPLATES)]
    assert c.JupyterHub.template_vars["paitient_offers_tokens"] is tokens.offers_tokens
    assert "self" not in c.PaitientLDAPAuthenticator.researcher_scopes


def test_the_token_routes_come_before_jupyterhubs_own():
    from jupyterhub.apihandlers import default_handlers as api_handlers
    from jupyterhub.handlers import default_handlers as page_handlers

    ours = dict(tokens.handlers())
    stock = dict(api_handlers + page_handlers)
    for route, handler in ours.items():
        assert route in stock and issubclass(handler, stock[route]), route


@pytest.mark.parametrize(
    ("held", "expected"),
    [
        ({"user", "researcher"}, ""),  # JupyterHub's way to the user's own server
        ({"user", "researcher", "steward"}, ""),
        ({"user", "steward"}, "/services/airlock/"),
        ({"user", "admin"}, "/hub/home"),
    ],
)
def test_where_signing_in_lands(held, expected):
    assert landing.landing(held, hub_prefix="/hub/", review_prefix="/services/airlock/") == expected


def test_a_steward_lands_on_the_hub_home_when_there_is_no_airlock():
    assert landing.landing({"steward"}, hub_prefix="/hub/", review_prefix=None) == "/hub/home"


# ------------------------------------------------------------------ tokens held from before (revoke_held, sweep)


@pytest.fixture
def hub_db():
    """JupyterHub's own database, in memory: alice a researcher with a running server, sam a steward."""
    db = orm.new_session_factory("sqlite://")()
    researcher, steward = orm.Role(name="researcher"), orm.Role(name="steward")
    alice, sam = orm.User(name="alice"), orm.User(name="sam")
    db.add_all([researcher, steward, alice, sam])
    alice.roles.append(researcher)
    sam.roles.append(steward)
    server = orm.Server(base_url="/user/alice/")
    db.add(server)
    db.add(orm.Spawner(name="", user=alice, server=server))
    db.add_all([orm.OAuthClient(identifier="jupyterhub"), orm.OAuthClient(identifier="jupyterhub-user-alice")])
    db.commit()
    yield db
    db.close()


def _notes(user) -> set[str]:
    return {t.note for t in user.api_tokens}


def test_a_researchers_old_tokens_are_revoked_and_the_hubs_own_kept(hub_db):
    alice, sam = orm.User.find(hub_db, "alice"), orm.User.find(hub_db, "sam")
    old = alice.new_api_token(note="Requested via api by user alice")  # from before she joined a project
    stale = alice.new_api_token(note="Server at /user/alice/other/")  # names a server she does not have
    alice.new_api_token(note="Server at /user/alice/")  # her running server's own
    alice.new_api_token(note="sign-in", client_id="jupyterhub-user-alice")  # her browser's OAuth sign-in
    sam.new_api_token(note="review script")

    revoked = tokens.sweep(hub_db)

    assert set(revoked) == {"alice"} and sorted(revoked["alice"]) == sorted([old[:4], stale[:4]])
    assert orm.APIToken.find(hub_db, old) is None and orm.APIToken.find(hub_db, stale) is None
    assert _notes(alice) == {"Server at /user/alice/", "sign-in"}
    assert _notes(sam) == {"review script"}  # a steward keeps theirs
    assert tokens.sweep(hub_db) == {}  # nothing left to revoke


def test_a_researcher_through_a_group_is_swept_too(hub_db):
    bob = orm.User(name="bob")
    group = orm.Group(name="oncology")
    hub_db.add_all([bob, group])
    group.users.append(bob)
    group.roles.append(orm.Role.find(hub_db, "researcher"))
    hub_db.commit()
    token = bob.new_api_token(note="Requested via api by user bob")
    assert tokens.sweep(hub_db) == {"bob": [token[:4]]}
    assert orm.APIToken.find(hub_db, token) is None


def test_the_hubs_notes_for_server_tokens_are_reserved():
    assert all(tokens.RESERVED_NOTE_MESSAGE.count(prefix.strip()) for prefix in tokens.SERVER_TOKEN_NOTES)
