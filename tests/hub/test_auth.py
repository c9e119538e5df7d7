"""Hospital sign-on against a real slapd: who gets in, with which projects and roles, and who does not.

The authenticator is driven through JupyterHub's outer API ``get_authenticated_user`` (authenticate,
normalise, validate, allow, post-auth hook) exactly as the login handler calls it.
"""

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tornado import web
from traitlets.config import Config

from paitient.config import ConfigError
from paitient.hub import signon
from paitient.hub.auth import PaitientLDAPAuthenticator, configure_from_site
from paitient.ops.demo import DEMO_BASE_DN
from paitient.services.audit import trail_dir
from paitient.services.audit.query import newest_first

PEOPLE = f"ou=people,{DEMO_BASE_DN}"


class CountingAuthenticator(PaitientLDAPAuthenticator):
    """Records every DN the authenticator tries to bind as (to prove some names never reach the directory)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.binds: list[str | None] = []

    def get_connection(self, userdn, password):
        self.binds.append(userdn)
        return super().get_connection(userdn, password)


def login_records(site):
    return [r for r in newest_first(trail_dir(site)) if r["action"] == "auth.login"]


async def sign_in(auth, username, password):
    return await auth.get_authenticated_user(None, {"username": username, "password": password})


@pytest.fixture
def demo(slapd, demo_site, make_authenticator):
    site = demo_site()
    auth = make_authenticator(site, slapd.url, cls=CountingAuthenticator)
    return site, auth, slapd.credentials()


# ---------------------------------------------------------------------------------- who gets in


@pytest.mark.parametrize(
    ("user", "projects"),
    [("alice", ["oncology"]), ("bob", ["cardiometabolic"]), ("carol", ["cardiometabolic", "oncology"])],
)
async def test_project_members_sign_in_with_their_projects(demo, user, projects):
    site, auth, creds = demo
    model = await sign_in(auth, user, creds[user])
    assert model["name"] == user
    assert model["groups"] == projects
    assert [r["name"] for r in model["roles"]] == ["user", "researcher"]
    assert model["admin"] is False
    assert model["auth_state"] == {
        "dn": f"uid={user},{PEOPLE}",
        "projects": projects,
        "roles": ["researcher"],
        "ldap_groups": sorted(f"cn={p},ou=groups,{DEMO_BASE_DN}" for p in projects),
    }
    [record] = login_records(site)
    assert (record["actor"], record["outcome"]) == (user, "ok")
    assert record["details"]["projects"] == projects


async def test_steward_without_project_signs_in_with_the_steward_role(demo):
    site, auth, creds = demo
    model = await sign_in(auth, "sam", creds["sam"])
    assert model["groups"] == []
    steward = [r for r in model["roles"] if r["name"] == "steward"]
    assert [r["name"] for r in model["roles"]] == ["user", "steward"]
    assert "custom:audit:read" in steward[0]["scopes"]
    assert model["auth_state"]["roles"] == ["steward"]


async def test_login_name_case_does_not_make_another_user(demo):
    _, auth, creds = demo
    model = await sign_in(auth, "ALICE", creds["alice"])
    assert model["name"] == "alice"


async def test_admin_group_makes_hub_admins_of_accounts_in_no_project(slapd, demo_site, make_authenticator, caplog):
    """Dave (in no project) in the admin group is a hub admin. Bob (a researcher) in it is not: JupyterHub's
    admin role opens every researcher's server and mints API tokens for anyone, so a researcher holding it
    could take a steward's token and approve her own release (a review's attack). He signs in as a
    researcher, and the log says why."""
    # the group is edited as the directory's root, the way the hospital's directory admins would
    subprocess.run(
        ["ldapmodify", "-x", "-H", slapd.url, "-D", slapd.rootdn, "-y", str(slapd.rootpw_file)],
        input=(
            f"dn: cn=workspace-admins,ou=groups,{DEMO_BASE_DN}\nchangetype: modify\n"
            f"add: member\nmember: uid=bob,{PEOPLE}\nmember: uid=dave,{PEOPLE}\n"
        ).encode(),
        check=True,
        capture_output=True,
    )
    auth = make_authenticator(demo_site(), slapd.url)
    model = await sign_in(auth, "dave", slapd.credentials()["dave"])
    assert model["admin"] is True and [r["name"] for r in model["roles"]] == ["user", "admin"]
    model = await sign_in(auth, "bob", slapd.credentials()["bob"])
    assert model["admin"] is False
    assert [r["name"] for r in model["roles"]] == ["user", "researcher"]
    assert "'bob' is in the admin group and in project(s)" in caplog.text and "not a hub admin" in caplog.text
    model = await sign_in(auth, "alice", slapd.credentials()["alice"])
    assert model["admin"] is False


# ---------------------------------------------------------------------------------- who does not


async def test_user_in_no_project_is_told_so(demo):
    site, auth, creds = demo
    with pytest.raises(web.HTTPError) as e:
        await sign_in(auth, "dave", creds["dave"])
    assert e.value.status_code == 403
    assert e.value.log_message == (
        "You are not a member of any paitient project. Ask your data integration centre to add you to a project group."
    )
    [record] = login_records(site)
    assert (record["actor"], record["outcome"], record["details"]["reason"]) == (
        "dave",
        "denied",
        "not a member of any project",
    )


@pytest.mark.parametrize(
    ("user", "password", "reason"),
    [
        ("alice", "wrong", "wrong password or unknown user"),
        ("alice", "", "empty password"),
        ("alice", "   ", "empty password"),
        ("zelda", "anything", "wrong password or unknown user"),
    ],
)
async def test_wrong_empty_or_unknown_is_refused_without_detail(demo, user, password, reason):
    site, auth, creds = demo
    assert await sign_in(auth, user, password) is None
    [record] = login_records(site)
    assert (record["actor"], record["outcome"], record["details"]["reason"]) == (user, "denied", reason)


async def test_empty_password_never_reaches_the_directory(demo):
    # an LDAP simple bind with an empty password is an anonymous bind that *succeeds*
    _, auth, _ = demo
    assert await sign_in(auth, "alice", "") is None
    assert auth.binds == []


async def test_another_users_password_does_not_work(demo):
    _, auth, creds = demo
    assert await sign_in(auth, "alice", creds["carol"]) is None


# ---------------------------------------------------------------------------------- hostile names

HOSTILE = [
    "*",
    ")(uid=*",
    "alice)(uid=*",
    "*)(|(uid=*",
    "al*",
    "alice,ou=people",
    "uid=alice",
    "alice\\",
    "alice\\2a",
    "alice\x00",
    "alice\x00)(uid=*",
    "a" * 65,
    "alice" + "x" * 5000,
    " alice",
    "alice ",
    "\u0430lice",  # Cyrillic a
    "\u212a",  # Kelvin sign: lower-cases to ASCII k
    "alice\n",
    "alice@hospital.example",
    "alice+cn=x",
    '"alice"',
    "<alice>",
    "alice;",
    "",
]


@pytest.mark.parametrize("name", HOSTILE, ids=[repr(n)[:24] for n in HOSTILE])
async def test_names_with_filter_or_dn_syntax_are_refused_before_any_directory_call(demo, name):
    site, auth, creds = demo
    # alice's real password: if the name matched alice in any way, sign-in would succeed
    assert await sign_in(auth, name, creds["alice"]) is None
    assert auth.binds == []
    [record] = login_records(site)
    assert record["outcome"] == "denied" and record["details"]["reason"].startswith("invalid username")
    assert len(record["actor"]) <= 67


def test_hub_level_validation_refuses_the_same_names():
    auth = PaitientLDAPAuthenticator(bind_dn_template=["uid={username},ou=people,dc=x"])
    for name in HOSTILE:
        assert not auth.validate_username(name), name
    assert auth.validate_username("alice.adler-2_x")


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("cn=Smith\\, Jones,ou=Groups,dc=x", "CN=smith\\2C jones, OU=groups,DC=X", True),
        ("cn=Zo\\C3\\AB,dc=x", "cn=Zoë,dc=x", True),
        ("cn=a\\,b=c,dc=x", "cn=a,b=c,dc=x", False),
        ("cn=oncology,ou=groups,dc=x", "cn=oncology-2,ou=groups,dc=x", False),
        # one entry whose name has two values is not an entry in a unit of that name
        ("cn=data-stewards+ou=restricted,ou=groups,dc=x", "cn=data-stewards,ou=restricted,ou=groups,dc=x", False),
        ("CN=a + OU=b,dc=x", "cn=a+ou=b,dc=x", True),
    ],
)
def test_group_dns_compare_by_meaning_not_spelling(a, b, same):
    assert (signon.normalise_dn(a) == signon.normalise_dn(b)) is same


def test_usernames_in_logs_are_cut_and_escaped():
    assert signon.shown("alice") == "'alice'"
    assert "\x00" not in signon.shown("a\x00b") and "\\x00" in signon.shown("a\x00b")
    long = signon.shown("x" * 5000)
    assert len(long) < 60 and "(5000 chars)" in long


# ---------------------------------------------------------------------------------- directory down


async def test_directory_down_shows_a_message_and_sign_in_recovers(demo, slapd):
    site, auth, creds = demo
    slapd.stop()
    started = time.monotonic()
    with pytest.raises(web.HTTPError) as e:
        await sign_in(auth, "alice", creds["alice"])
    assert time.monotonic() - started < auth.timeout + 1
    assert e.value.status_code == 503
    assert e.value.log_message == "The hospital directory cannot be reached; try again in a few minutes."
    assert login_records(site)[0]["outcome"] == "error"
    slapd.start()  # same object, same port
    model = await sign_in(auth, "alice", creds["alice"])
    assert model["groups"] == ["oncology"]


async def test_hung_directory_times_out_instead_of_hanging_the_hub(slapd, demo_site, make_authenticator):
    auth = make_authenticator(demo_site(timeout=1.0), slapd.url)
    creds = slapd.credentials()
    os.kill(slapd.pid, signal.SIGSTOP)
    try:
        # the event loop stays free while the directory call waits in a thread
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        started = time.monotonic()
        with pytest.raises(web.HTTPError) as e:
            await sign_in(auth, "alice", creds["alice"])
        elapsed = time.monotonic() - started
        ticker.cancel()
        assert e.value.status_code == 503
        assert elapsed < 4
        assert ticks >= 10
    finally:
        os.kill(slapd.pid, signal.SIGCONT)
    assert (await sign_in(auth, "alice", creds["alice"]))["name"] == "alice"


# ---------------------------------------------------------------------------------- audit


async def test_sign_in_without_an_audit_record_is_refused(demo, tmp_path):
    site, auth, creds = demo
    audit_dir = trail_dir(site)
    audit_dir.parent.mkdir(parents=True, exist_ok=True)
    audit_dir.write_text("not a directory")  # the trail cannot be written
    with pytest.raises(web.HTTPError) as e:
        await sign_in(auth, "alice", creds["alice"])
    assert e.value.status_code == 503
    assert "audit trail" in e.value.log_message


async def test_refused_sign_ins_while_the_trail_is_down_are_recorded_once_it_is_back_after_a_restart(demo):
    """Attack: guess passwords while the audit trail is down. A refusal needs no record before it (nothing
    happens) but must not go unrecorded: it waits, held in the hub's file, and is written before the next
    sign-in's own record, though the hub restarted in between; the sign-in waits for it."""
    from paitient.hub import records
    from tests.trail import trail_down

    site, auth, creds = demo
    with trail_down(site):
        for guess in ("letmein", "hunter2"):
            assert await sign_in(auth, "alice", guess) is None
        with pytest.raises(web.HTTPError) as e:  # a sign-in is not let through with records waiting
            await sign_in(auth, "alice", creds["alice"])
        assert e.value.status_code == 503
    held = [r["event"]["details"]["reason"] for _, r in records.HeldFile(records.held_path(site.state_dir)).held()]
    assert held == ["wrong password or unknown user"] * 2
    assert login_records(site) == []
    records._backlogs.clear()  # the hub's process ends: only the file is left
    assert (await sign_in(auth, "alice", creds["alice"]))["name"] == "alice"
    got = [(r["outcome"], "happened" in r["details"]) for r in reversed(login_records(site))]
    assert got == [("denied", True), ("denied", True), ("ok", False)]
    assert not records.held_path(site.state_dir).exists()


# ---------------------------------------------------------------------------------- TLS choice


def _tls(demo_site, url, **directory):
    c = Config()
    configure_from_site(c, demo_site(url=url, **directory), None)
    return PaitientLDAPAuthenticator(config=c)


@pytest.mark.parametrize(
    ("url", "tls", "strategy", "port"),
    [
        ("ldap://127.0.0.1:3890/", "auto", "insecure", 3890),
        ("ldap://localhost/", "none", "insecure", 389),
        ("ldap://[::1]:3890/", "auto", "insecure", 3890),
        ("ldap://127.0.0.2/", "none", "insecure", 389),
        ("ldap://127.0.0.1/", "starttls", "before_bind", 389),
        ("ldap://dc1.hospital.example/", "auto", "before_bind", 389),
        ("ldap://dc1.hospital.example/", "starttls", "before_bind", 389),
        ("ldaps://dc1.hospital.example/", "auto", "on_connect", 636),
        ("ldap://dc1.hospital.example:3269/", "ldaps", "on_connect", 3269),
    ],
)
def test_tls_strategy_follows_the_site_configuration(demo_site, url, tls, strategy, port):
    auth = _tls(demo_site, url, tls=tls, bind_dn_template=["uid={username},ou=people,dc=x"])
    assert auth.tls_strategy.name == strategy
    assert auth.server_port == port
    if strategy == "insecure":
        assert auth.tls_kwargs == {}
    else:
        assert auth.tls_kwargs["validate"] == ssl.CERT_REQUIRED


def test_remote_directory_with_ca_file_verifies_against_it(demo_site, tmp_path):
    auth = _tls(demo_site, "ldaps://dc1.hospital.example/", ca_file="/etc/ssl/hospital-ca.pem")
    assert auth.tls_kwargs == {"validate": ssl.CERT_REQUIRED, "ca_certs_file": "/etc/ssl/hospital-ca.pem"}


def test_clear_text_to_a_remote_directory_is_refused(demo_site):
    with pytest.raises(ConfigError, match="clear text"):
        demo_site(url="ldap://dc1.hospital.example/", tls="none")
    with pytest.raises(ValueError, match="clear text"):
        signon.tls_choice(demo_site().directory.__class__(url="ldap://10.0.0.5/", tls="none"))


class Eavesdropper:
    """A loopback TCP server posing as a directory: records every byte a client sends, never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(5)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(3)
            try:
                while chunk := conn.recv(65536):
                    self.received += chunk
            except OSError:
                pass

    def close(self):
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize("tls", ["starttls", "none"])
async def test_password_crosses_the_wire_only_inside_tls(demo_site, make_authenticator, tls):
    spy = Eavesdropper()
    try:
        auth = make_authenticator(demo_site(url=f"ldap://127.0.0.1:{spy.port}/", tls=tls, timeout=1.0))
        with pytest.raises(web.HTTPError) as e:
            await sign_in(auth, "alice", "s3cret-Pa55word")
        assert e.value.status_code == 503
    finally:
        spy.close()
    if tls == "starttls":
        # the first and only thing sent is the StartTLS request; the server never upgraded, so no bind
        assert b"1.3.6.1.4.1.1466.20037" in spy.received
        assert b"s3cret-Pa55word" not in spy.received
    else:
        # the loopback-only clear-text mode does send it: the spy would have seen a password
        assert b"s3cret-Pa55word" in spy.received


# ---------------------------------------------------------------------------------- configuration


def test_configure_from_site_sets_groups_roles_and_allowed_groups(demo_site):
    c = Config()
    site = demo_site()
    configure_from_site(c, site, "ldap://127.0.0.1:3890/")
    auth = PaitientLDAPAuthenticator(config=c)
    assert c.JupyterHub.authenticator_class == "paitient-ldap"
    assert auth.manage_groups and auth.manage_roles
    assert auth.project_groups == {
        "oncology": f"cn=oncology,ou=groups,{DEMO_BASE_DN}",
        "cardiometabolic": f"cn=cardiometabolic,ou=groups,{DEMO_BASE_DN}",
    }
    assert set(auth.allowed_groups) == {*auth.project_groups.values(), auth.steward_group}
    assert auth.bind_dn_template == [f"uid={{username}},ou=people,{DEMO_BASE_DN}"]
    assert "custom:audit:read" in c.JupyterHub.custom_scopes
    assert auth.site == site


def test_configure_needs_a_directory_url(demo_site):
    with pytest.raises(ConfigError, match="no directory url"):
        configure_from_site(Config(), demo_site(), None)


async def test_managed_roles_are_loadable(demo):
    _, auth, _ = demo
    roles = {r["name"]: r for r in await auth.load_managed_roles()}
    assert set(roles) == {"researcher", "steward"}
    # a researcher's own-account scopes, without `self` (it includes creating API tokens)
    assert roles["researcher"]["scopes"] == list(signon.OWN_SCOPES)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("user_attribute", "uid)(objectClass=*", "not an attribute name"), ("timeout", 0, "timeout")],
)
def test_directory_settings_that_would_reach_a_filter_or_hang_are_refused(demo_site, key, value, message):
    with pytest.raises(ConfigError, match=message):
        demo_site(**{key: value})


async def test_blocked_user_is_refused_and_recorded(slapd, demo_site, make_authenticator):
    site = demo_site()
    auth = make_authenticator(site, slapd.url, blocked_users={"alice"})
    assert await sign_in(auth, "alice", slapd.credentials()["alice"]) is None
    [record] = login_records(site)
    assert (record["outcome"], record["details"]["reason"]) == ("denied", "blocked by the hub configuration")
    assert (await sign_in(auth, "bob", slapd.credentials()["bob"]))["name"] == "bob"


async def test_group_base_that_does_not_exist_gives_no_projects(slapd, demo_site, make_authenticator):
    auth = make_authenticator(demo_site(group_base=f"ou=nowhere,{DEMO_BASE_DN}"), slapd.url)
    with pytest.raises(web.HTTPError) as e:
        await sign_in(auth, "alice", slapd.credentials()["alice"])
    assert e.value.status_code == 403


@given(st.text(max_size=80))
def test_any_accepted_name_is_plain_ascii_without_ldap_syntax(text):
    for allow_at in (False, True):
        if signon.username_problem(text, allow_at=allow_at) is None:
            allowed = set("abcdefghijklmnopqrstuvwxyz0123456789._-" + ("@" if allow_at else ""))
            assert set(text.lower()) <= allowed
            assert text.lower()[0] not in "._-@"
            assert text.count("@") <= 1


async def test_password_guessing_is_paused_per_name_without_asking_the_directory(demo):
    """Attack: guess alice's password. Each failure reached the directory (whose own lockout then locks the
    hospital account) and wrote a record. Past failed_signins failures in failed_signin_pause seconds the
    name waits: the attempt is refused with 429 and when to try again, the directory is not asked, and one
    refusal is recorded per wait. Another name is not held up; the right password, once the wait is over,
    signs in and clears the count."""
    site, auth, creds = demo
    clock = [1000.0]
    auth.failed_signins, auth.failed_signin_pause = 3, 300.0
    auth._throttle = signon.SignInThrottle(3, 300.0, clock=lambda: clock[0])
    for guess in ("letmein", "hunter2", "alice123"):
        assert await sign_in(auth, "alice", guess) is None
    binds = len(auth.binds)
    for attempt in ("password1", creds["alice"]):  # the right password too: the name waits
        with pytest.raises(web.HTTPError) as e:
            await sign_in(auth, "Alice", attempt)
        assert e.value.status_code == 429
        assert e.value.log_message.startswith("Too many failed sign-ins with this name. Try again in 5 minutes")
    assert len(auth.binds) == binds  # the directory was not asked
    reasons = [r["details"]["reason"] for r in reversed(login_records(site))]
    assert reasons == ["wrong password or unknown user"] * 3 + [
        "too many failed sign-ins (later attempts not recorded)"
    ]
    assert (await sign_in(auth, "carol", creds["carol"]))["name"] == "carol"
    clock[0] += 299
    with pytest.raises(web.HTTPError) as e:
        await sign_in(auth, "alice", creds["alice"])
    assert "Try again in 1 minute;" in e.value.log_message
    clock[0] += 2
    assert (await sign_in(auth, "alice", creds["alice"]))["name"] == "alice"
    for guess in ("a1", "a2"):  # the count started again at the sign-in
        assert await sign_in(auth, "alice", guess) is None
    assert (await sign_in(auth, "alice", creds["alice"]))["name"] == "alice"


async def test_refusals_of_ever_new_names_fill_the_trail_only_to_a_count_a_minute(demo):
    """Attack: from the login form, with no account, sign in as ever-new names (the per-name throttle never
    holds one) and with names refused outright, to fill the audit trail, whose being full stops every
    researcher's cells. Past refusals_recorded in a window the refusals are counted, not recorded: the
    window's count goes into one record when it is over. The next window records one by one again."""
    site, auth, creds = demo
    auth._refusals = signon.RefusalRecords(3, window=1.0)
    before = len(login_records(site))
    for i in range(9):
        assert await sign_in(auth, f"guess{i}", "wrong") is None
    assert await sign_in(auth, "not a name!", "x") is None
    assert await sign_in(auth, "guess9", "") is None
    assert len(login_records(site)) == before + 3  # the window's first three
    await asyncio.sleep(1.3)  # the window ends; the count is recorded
    records = login_records(site)[: len(login_records(site)) - before]
    assert len(records) == 4
    summary = records[0]
    assert summary["actor"] == "system" and summary["outcome"] == "denied"
    assert summary["details"]["refusals"] == 8
    assert summary["details"]["reason"] == "8 more sign-ins refused within a minute (not recorded one by one)"
    assert [r["details"]["reason"] for r in records[1:]] == ["wrong password or unknown user"] * 3
    assert await sign_in(auth, "guess10", "wrong") is None  # a new window: recorded by itself
    assert login_records(site)[0]["details"]["reason"] == "wrong password or unknown user"
    assert (await sign_in(auth, "alice", creds["alice"]))["name"] == "alice"  # a sign-in is always recorded
    assert login_records(site)[0]["outcome"] == "ok"


def test_refusal_windows_record_their_first_ones_and_count_the_rest():
    clock = [0.0]
    refusals = signon.RefusalRecords(2, window=60.0, clock=lambda: clock[0])
    assert [refusals.take() for _ in range(4)] == [(True, False), (True, False), (False, True), (False, False)]
    assert refusals.seconds_left() == 60.0
    clock[0] = 60.0
    assert refusals.take() == (True, False) and refusals.seconds_left() == 60.0
    assert refusals.release() == 2 and refusals.release() == 0


def test_the_throttle_forgets_the_oldest_names_first_when_flooded_with_new_ones():
    clock = [0.0]
    throttle = signon.SignInThrottle(1, 60.0, clock=lambda: clock[0])
    throttle.failed("first")
    for i in range(signon.THROTTLED_NAMES):
        throttle.failed(f"name{i}")
    assert throttle.wait("first") == 0.0 and throttle.wait("name0") == 60.0
    assert len(throttle._failures) == signon.THROTTLED_NAMES
