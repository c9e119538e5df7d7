"""Search-then-bind with a service account against an Active-Directory-like directory (real slapd).

Active Directory is modelled with a tiny schema: ``sAMAccountName`` and ``userPrincipalName`` (AD's own
OIDs, case-insensitive matching as in AD) on an auxiliary class, users named by ``cn`` (their DN does
not contain the login name), groups as groupOfNames, and a service account under its own OU.
"""

import os
import subprocess

import ldap3
import pytest
from jupyterhub import orm
from jupyterhub.user import User
from tornado import web

from paitient.config import ConfigError, parse
from paitient.hub.auth import PaitientLDAPAuthenticator
from paitient.hub.signon import normalise_dn
from paitient.ops.directory import DEFAULT_SCHEMAS, ldif_entry, ssha
from paitient.services.audit import trail_dir
from paitient.services.audit.query import newest_first

BASE = "dc=corp,dc=example"
USERS = f"ou=Users,{BASE}"
GROUPS = f"ou=Groups,{BASE}"
SERVICE_DN = f"cn=paitient-svc,ou=Service Accounts,{BASE}"
ONCOLOGY = f"cn=Oncology Researchers,{GROUPS}"

AD_SCHEMA = """
attributetype ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.656 NAME 'userPrincipalName'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.4203.666.11.99.1 NAME 'paitientTestADAccount'
    SUP top AUXILIARY MAY ( sAMAccountName $ userPrincipalName ) )
"""

# cn, sAMAccountName, password, groups
PEOPLE = [
    ("Alice Adler", "aadler", "alice-pw-1", ["Oncology Researchers"]),
    ("Xavier Xu", "xavier", "xavier-pw-1", ["Oncology Researchers"]),
    ("Star Entry", "x*", "star-pw-1", []),
    ("Comma, Carl", "ccarl", "carl-pw-1", ["Cardio"]),
    ("Dave Dorn", "ddorn", "dave-pw-1", []),
    ("Twin One", "twin", "twin-pw-1", ["Oncology Researchers"]),
    ("Twin Two", "twin", "twin-pw-2", ["Oncology Researchers"]),
    ("Sam Steward", "ssteward", "sam-pw-1", ["Data Stewards"]),
    ("mmeier", "mmeier", "mia-pw-1", ["Oncology Researchers"]),  # a DN that does contain the login name
]
SERVICE_PASSWORD = "svc-pw-1"


def user_dn(cn: str) -> str:
    return f"cn={ldap3.utils.dn.escape_rdn(cn)},{USERS}"


def corp_ldif() -> str:
    entries = [
        ldif_entry(BASE, {"objectClass": ["dcObject", "organization"], "dc": "corp", "o": "Corp Hospital"}),
        *(
            ldif_entry(f"ou={ou},{BASE}", {"objectClass": "organizationalUnit", "ou": ou})
            for ou in ("Users", "Groups", "Service Accounts")
        ),
        ldif_entry(
            SERVICE_DN,
            {
                "objectClass": ["applicationProcess", "simpleSecurityObject"],
                "cn": "paitient-svc",
                "userPassword": ssha(SERVICE_PASSWORD),
            },
        ),
    ]
    groups: dict[str, list[str]] = {}
    for cn, sam, password, member_of in PEOPLE:
        entries.append(
            ldif_entry(
                user_dn(cn),
                {
                    "objectClass": ["inetOrgPerson", "paitientTestADAccount"],
                    "cn": cn,
                    "sn": cn.split()[-1],
                    "sAMAccountName": sam,
                    "userPrincipalName": f"{sam}@corp.example",
                    "userPassword": ssha(password),
                },
            )
        )
        for g in member_of:
            groups.setdefault(g, []).append(user_dn(cn))
    for g, members in groups.items():
        entries.append(ldif_entry(f"cn={g},{GROUPS}", {"objectClass": "groupOfNames", "cn": g, "member": members}))
    return "\n".join(entries)


@pytest.fixture
def corp(make_slapd, tmp_path):
    schema = tmp_path / "ad-like.schema"
    schema.write_text(AD_SCHEMA)
    return make_slapd(BASE, corp_ldif(), schemas=[*DEFAULT_SCHEMAS, schema], name="corp")


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "service-password"
    path.write_text(SERVICE_PASSWORD + "\n")
    os.chmod(path, 0o600)
    return path


def corp_site(tmp_path, url, password_file, **directory):
    raw = {
        "workspace": {"state_dir": str(tmp_path / "state")},
        "directory": {
            "url": url,
            "tls": "none",
            "lookup_dn": True,
            "search_base": USERS,
            "user_attribute": "sAMAccountName",
            "service_dn": SERVICE_DN,
            "service_password_file": str(password_file),
            "group_base": GROUPS,
            "steward_group": "Data Stewards",
            **directory,
        },
        "projects": [
            {"name": "oncology", "group": ONCOLOGY},
            {"name": "cardiometabolic", "group": "Cardio"},  # a plain cn, found under group_base
        ],
    }
    return parse(raw)


@pytest.fixture
def corp_auth(corp, tmp_path, password_file, make_authenticator):
    def make(**directory):
        return make_authenticator(corp_site(tmp_path, corp.url, password_file, **directory))

    return make


async def sign_in(auth, username, password):
    return await auth.get_authenticated_user(None, {"username": username, "password": password})


async def test_sam_account_name_search_then_bind(corp_auth):
    auth = corp_auth()
    assert auth.lookup_dn and auth.user_attribute == "sAMAccountName"
    assert auth.lookup_dn_search_user == SERVICE_DN
    model = await sign_in(auth, "AAdler", "alice-pw-1")
    assert model["name"] == "aadler"
    assert model["groups"] == ["oncology"]
    assert model["auth_state"]["dn"] == user_dn("Alice Adler")
    assert await sign_in(auth, "aadler", "xavier-pw-1") is None


async def test_group_given_as_plain_name_and_dn_with_escaped_comma(corp_auth):
    # Carl's DN is "cn=Comma\\, Carl,...": the member filter must escape the backslash correctly
    model = await sign_in(corp_auth(), "ccarl", "carl-pw-1")
    assert model["groups"] == ["cardiometabolic"]
    # the server answers with its own escaping (\\2C); both name the same entry
    assert normalise_dn(model["auth_state"]["dn"]) == normalise_dn(user_dn("Comma, Carl"))


async def test_steward_group_by_name(corp_auth):
    model = await sign_in(corp_auth(), "ssteward", "sam-pw-1")
    assert model["groups"] == [] and model["auth_state"]["roles"] == ["steward"]


async def test_user_in_no_project_is_told_so(corp_auth):
    with pytest.raises(web.HTTPError) as e:
        await sign_in(corp_auth(), "ddorn", "dave-pw-1")
    assert e.value.status_code == 403 and "not a member of any paitient project" in e.value.log_message


async def test_user_principal_name_login(corp_auth):
    auth = corp_auth(user_attribute="userPrincipalName")
    model = await sign_in(auth, "aadler@corp.example", "alice-pw-1")
    assert model["name"] == "aadler@corp.example"
    assert model["groups"] == ["oncology"]
    assert auth.validate_username("aadler@corp.example")
    for bad in ("a@b@c", "@corp.example", "aadler@", "aadler@corp.example)(cn=*", "*@corp.example"):
        assert await sign_in(auth, bad, "alice-pw-1") is None, bad


async def test_ambiguous_login_name_is_refused(corp_auth):
    # two entries carry sAMAccountName "twin": neither password may pick one of them
    auth = corp_auth()
    assert await sign_in(auth, "twin", "twin-pw-1") is None
    assert await sign_in(auth, "twin", "twin-pw-2") is None


async def test_literal_asterisk_in_the_directory_cannot_match_others(corp_auth, corp):
    auth = corp_auth()
    # the attack is real: an unescaped filter "(sAMAccountName=x*)" matches Xavier too
    conn = auth.get_connection(SERVICE_DN, SERVICE_PASSWORD)
    conn.search(USERS, "(sAMAccountName=x*)", attributes=["cn"])
    assert {r["dn"] for r in conn.response if r["type"] == "searchResEntry"} == {
        user_dn("Xavier Xu"),
        user_dn("Star Entry"),
    }
    # the lookup escapes it: the literal entry only, and "*" alone matches nobody
    assert auth._lookup("x*") == user_dn("Star Entry")
    assert auth._lookup("*") is None
    assert auth._lookup("x") is None
    # the star entry's own DN gets none of Xavier's groups
    star = auth.get_connection(user_dn("Star Entry"), "star-pw-1")
    assert auth._groups_of(star, user_dn("Star Entry")) == set()
    # and at the front door the name never reaches the directory, even with Xavier's password
    assert await sign_in(auth, "x*", "xavier-pw-1") is None
    assert await sign_in(auth, "x*", "star-pw-1") is None


async def test_wrong_service_password_is_an_operator_problem(corp, tmp_path, make_authenticator):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-it")
    os.chmod(wrong, 0o600)
    auth = make_authenticator(corp_site(tmp_path, corp.url, wrong))
    with pytest.raises(web.HTTPError) as e:
        await sign_in(auth, "aadler", "alice-pw-1")
    assert e.value.status_code == 503
    assert "service account was refused" in e.value.log_message


def test_service_password_file_must_be_root_only(corp, tmp_path, password_file, make_authenticator):
    os.chmod(password_file, 0o644)
    with pytest.raises(ConfigError, match="readable by root only"):
        make_authenticator(corp_site(tmp_path, corp.url, password_file))
    with pytest.raises(ConfigError, match="does not exist"):
        make_authenticator(corp_site(tmp_path, corp.url, tmp_path / "missing"))


def test_plain_group_names_need_a_group_base(corp, tmp_path, password_file, make_authenticator):
    with pytest.raises(ConfigError, match="group_base"):
        make_authenticator(corp_site(tmp_path, corp.url, password_file, group_base=""))


def test_service_password_never_on_a_command_line_or_in_the_config(corp_auth, password_file):
    auth = corp_auth()
    assert auth.service_password_file == str(password_file)
    assert "lookup_dn_search_password" not in auth.config.PaitientLDAPAuthenticator
    assert auth.lookup_dn_search_password == SERVICE_PASSWORD
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert SERVICE_PASSWORD not in ps


def test_authenticator_class_is_the_registered_entry_point():
    from importlib.metadata import entry_points

    [ep] = [e for e in entry_points(group="jupyterhub.authenticators") if e.name == "paitient-ldap"]
    assert ep.load() is PaitientLDAPAuthenticator


async def test_unknown_account_name_is_refused(corp_auth):
    auth = corp_auth()
    assert await sign_in(auth, "nosuchuser", "alice-pw-1") is None
    assert auth._lookup("nosuchuser") is None


def hub_user(name: str) -> User:
    """A real JupyterHub user object on an in-memory hub database."""
    db = orm.new_session_factory("sqlite:///:memory:")()
    orm_user = orm.User(name=name)
    db.add(orm_user)
    db.commit()
    return User(orm_user, db=db)


def modify_group(server, group_dn: str, change: str, member_dn: str) -> None:
    """Change a group as the directory's root, the way the hospital's directory admins would."""
    modify_entry(server, f"dn: {group_dn}\nchangetype: modify\n{change}: member\nmember: {member_dn}\n")


def modify_entry(server, ldif: str) -> None:
    """Apply an LDIF change as the directory's root."""
    subprocess.run(
        ["ldapmodify", "-x", "-H", server.url, "-D", server.rootdn, "-y", str(server.rootpw_file)],
        input=ldif.encode(),
        check=True,
        capture_output=True,
    )


async def test_refresh_follows_the_directory_and_signs_out_a_removed_researcher(corp_auth, corp):
    auth = corp_auth()
    user = hub_user("aadler")
    assert (await sign_in(auth, "aadler", "alice-pw-1"))["groups"] == ["oncology"]
    modify_group(corp, f"cn=Cardio,{GROUPS}", "add", user_dn("Alice Adler"))
    refreshed = await auth.refresh_user(user)
    assert refreshed["groups"] == ["cardiometabolic", "oncology"]
    modify_group(corp, ONCOLOGY, "delete", user_dn("Alice Adler"))
    modify_group(corp, f"cn=Cardio,{GROUPS}", "delete", user_dn("Alice Adler"))
    assert await auth.refresh_user(user) is False
    corp.stop()
    assert await auth.refresh_user(user) is True  # an outage does not sign everybody out


async def test_refresh_with_bind_template_and_service_account(corp, tmp_path, password_file, make_authenticator):
    site = corp_site(tmp_path, corp.url, password_file, lookup_dn=False, bind_dn_template=[f"cn={{username}},{USERS}"])
    auth = make_authenticator(site)
    assert auth.lookup_dn_search_user == SERVICE_DN
    assert (await sign_in(auth, "mmeier", "mia-pw-1"))["groups"] == ["oncology"]
    user = hub_user("mmeier")
    assert (await auth.refresh_user(user))["auth_state"]["dn"] == user_dn("mmeier")
    modify_group(corp, ONCOLOGY, "delete", user_dn("mmeier"))
    assert await auth.refresh_user(user) is False
    assert await auth.refresh_user(hub_user("nosuchuser")) is False


async def test_without_a_service_account_refresh_keeps_the_session(slapd, demo_site, make_authenticator):
    # the demo hospital named by url (not embedded): no service account is configured
    auth = make_authenticator(demo_site(url=slapd.url))
    assert auth.lookup_dn_search_user is None
    assert await auth.refresh_user(hub_user("alice")) is True


async def test_embedded_demo_directory_brings_its_service_account(slapd, demo_site, make_authenticator):
    auth = make_authenticator(demo_site(), slapd.url)
    assert auth.lookup_dn_search_user == slapd.service_dn
    assert (await auth.refresh_user(hub_user("carol")))["groups"] == ["cardiometabolic", "oncology"]
    modify_group(
        slapd, "cn=oncology,ou=groups,dc=hospital,dc=example", "delete", "uid=alice,ou=people,dc=hospital,dc=example"
    )
    assert await auth.refresh_user(hub_user("alice")) is False


async def test_an_account_the_directory_marks_inactive_is_refused_and_signed_out(corp_auth, corp):
    # A leaver's entry and groups often stay for a while; the hospital marks the account instead.
    auth = corp_auth(active_filter="(!(employeeType=left))")
    user = hub_user("aadler")
    assert (await sign_in(auth, "aadler", "alice-pw-1"))["groups"] == ["oncology"]
    assert (await auth.refresh_user(user))["groups"] == ["oncology"]
    modify_entry(corp, f"dn: {user_dn('Alice Adler')}\nchangetype: modify\nadd: employeeType\nemployeeType: left\n")
    assert await sign_in(auth, "aadler", "alice-pw-1") is None  # her password still binds
    reasons = [r["details"]["reason"] for r in newest_first(trail_dir(auth.site)) if r["action"] == "auth.login"]
    assert reasons[0] == "account not active (active_filter)"
    assert await auth.refresh_user(user) is False
    assert (await sign_in(corp_auth(), "aadler", "alice-pw-1"))["groups"] == ["oncology"]  # no filter: as before


async def test_a_project_or_role_the_directory_takes_away_leaves_the_registry_and_the_running_server(
    corp_auth, corp, make_system_user
):
    """The hospital takes Alice out of one of her two projects, and out of the stewards, while her server
    runs. The hub followed at its next refresh, but the accounts registry, which the launcher (a kernel's
    datasets and data groups) and the services (the airlock's projects, the stewards' pages) read, was
    written at her server's start only: her next kernels had the project's data for as long as she kept the
    server running. Now the refresh narrows the registry (her account leaves the project's group) and stops
    the server; a role the hub's own configuration gives (admin, without an admin group) stays."""
    import grp
    from types import SimpleNamespace

    from paitient.registry import Member, Registry
    from paitient.services.data import access

    auth = corp_auth()
    account = make_system_user("aadler")
    modify_group(corp, f"cn=Cardio,{GROUPS}", "add", user_dn("Alice Adler"))
    assert (await sign_in(auth, "aadler", "alice-pw-1"))["groups"] == ["cardiometabolic", "oncology"]
    site = auth.site
    registry = Registry.for_state_dir(site.state_dir)
    # as the spawner's ensure_account wrote it at her server's start (a steward then, and a hub admin)
    registry.put(
        Member(
            "aadler",
            account.pw_name,
            account.pw_uid,
            ("cardiometabolic", "oncology"),
            ("admin", "researcher", "steward"),
        )
    )
    access.sync_members(site)
    cardio = access.group_name(site, "cardiometabolic")
    assert account.pw_name in grp.getgrnam(cardio).gr_mem
    stopped: list[str] = []

    async def stop(name: str) -> None:
        stopped.append(name)

    user = SimpleNamespace(name="aadler", spawners={"": SimpleNamespace(active=True, pending=None)}, stop=stop)
    # She is not in Data Stewards: the role is taken, and the server it was started with stopped.
    assert (await auth.refresh_user(user))["groups"] == ["cardiometabolic", "oncology"]
    assert registry.by_username("aadler").roles == ("admin", "researcher") and stopped == [""]
    assert account.pw_name in grp.getgrnam(cardio).gr_mem
    stopped.clear()

    modify_group(corp, f"cn=Cardio,{GROUPS}", "delete", user_dn("Alice Adler"))
    assert (await auth.refresh_user(user))["groups"] == ["oncology"]
    member = registry.by_username("aadler")
    assert member.projects == ("oncology",) and member.roles == ("admin", "researcher")
    assert account.pw_name not in grp.getgrnam(cardio).gr_mem
    assert account.pw_name in grp.getgrnam(access.group_name(site, "oncology")).gr_mem
    assert stopped == [""]
    narrowed = [
        r
        for r in newest_first(trail_dir(site))
        if r["action"] == "auth.login" and r["details"].get("reason") == "access narrowed in the directory"
    ]
    assert [r["details"]["lost"] for r in narrowed] == [["project cardiometabolic"], ["role steward"]]
    assert (await auth.refresh_user(user))["groups"] == ["oncology"] and stopped == [""]  # nothing more to take


def add_entry(server, dn: str, attrs: dict) -> None:
    """Add an entry as the directory's root: what anyone the hospital lets manage groups can do."""
    modify_entry(server, ldif_entry(dn, attrs).rstrip("\n").replace(f"dn: {dn}\n", f"dn: {dn}\nchangetype: add\n", 1))


async def test_a_group_made_to_look_like_a_configured_one_grants_nothing(corp_auth, corp):
    """Attack, by someone who may make groups somewhere under the group base (often delegated to teams):
    Dave, in no project, puts himself in a team group with a second cn value ``Cardio`` (the cardiometabolic
    project is configured by that name); in a group ``cn=Cardio`` of a unit of his own; and, with the group
    base above ``ou=Groups``, in ``cn=Oncology Researchers+ou=Groups``, one entry whose name has two values.
    Each made him a member of the project. Now a name counts only as the one group whose own name it is,
    and a DN's separators count: none of them grants anything, and a name that names two groups grants
    nothing until its DN is configured (Carl, the real Cardio's member, loses it meanwhile)."""
    dave = user_dn("Dave Dorn")
    auth = corp_auth()
    assert auth.current_membership("ddorn").membership.projects == ()
    assert auth.current_membership("ccarl").membership.projects == ("cardiometabolic",)
    add_entry(
        corp, f"cn=Team Dave,{GROUPS}", {"objectClass": "groupOfNames", "cn": ["Team Dave", "Cardio"], "member": dave}
    )
    assert auth.current_membership("ddorn").membership.projects == ()
    assert auth.current_membership("ccarl").membership.projects == ("cardiometabolic",)
    add_entry(corp, f"ou=Team,{GROUPS}", {"objectClass": "organizationalUnit", "ou": "Team"})
    add_entry(corp, f"cn=Cardio,ou=Team,{GROUPS}", {"objectClass": "groupOfNames", "cn": "Cardio", "member": dave})
    assert auth.current_membership("ddorn").membership.projects == ()
    assert auth.current_membership("ccarl").membership.projects == ()
    add_entry(
        corp,
        f"cn=Oncology Researchers+ou=Groups,{BASE}",
        {"objectClass": "groupOfNames", "cn": "Oncology Researchers", "ou": "Groups", "member": dave},
    )
    wide = corp_auth(group_base=BASE)
    assert wide.current_membership("ddorn").membership.projects == ()
    assert wide.current_membership("aadler").membership.projects == ("oncology",)
