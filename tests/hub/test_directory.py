"""The embedded directory: a real slapd with the demo hospital, its access rules, files and lifecycle."""

import base64
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import ldap3
import pytest
from ldap3.core.exceptions import LDAPBindError

from paitient.ops.demo import DEMO_BASE_DN, DEMO_PEOPLE
from paitient.ops.directory import DemoDirectory, DirectoryError, Slapd, ldif_entry, ssha

PEOPLE = f"ou=people,{DEMO_BASE_DN}"
GROUPS = f"ou=groups,{DEMO_BASE_DN}"


def bind(url: str, dn: str | None = None, password: str | None = None) -> ldap3.Connection:
    server = ldap3.Server(url.rstrip("/"), get_info=ldap3.NONE, connect_timeout=3)
    return ldap3.Connection(server, user=dn, password=password, auto_bind=True, receive_timeout=3)


def members(conn: ldap3.Connection, group: str) -> set[str]:
    conn.search(f"cn={group},{GROUPS}", "(objectClass=groupOfNames)", ldap3.BASE, attributes=["member"])
    return {m.lower() for m in conn.response[0]["attributes"]["member"]}


def test_every_demo_person_binds_with_the_generated_password(slapd):
    creds = slapd.credentials()
    assert set(creds) == {p[0] for p in DEMO_PEOPLE}
    assert len(set(creds.values())) == len(creds), "passwords must differ"
    for name, password in creds.items():
        conn = bind(slapd.url, f"uid={name},{PEOPLE}", password)
        assert conn.extend.standard.who_am_i() == f"dn:uid={name},{PEOPLE}"
        conn.unbind()
    with pytest.raises(LDAPBindError):
        bind(slapd.url, f"uid=alice,{PEOPLE}", creds["bob"])


def test_groups_hold_the_demo_projects_and_the_stewards(slapd):
    creds = slapd.credentials()
    conn = bind(slapd.url, f"uid=dave,{PEOPLE}", creds["dave"])
    assert members(conn, "oncology") == {f"uid=alice,{PEOPLE}", f"uid=carol,{PEOPLE}"}
    assert members(conn, "cardiometabolic") == {f"uid=bob,{PEOPLE}", f"uid=carol,{PEOPLE}"}
    assert members(conn, "data-stewards") == {f"uid=sam,{PEOPLE}", f"uid=tina,{PEOPLE}"}
    # nobody is an admin of the demo: the group only names itself
    assert members(conn, "workspace-admins") == {f"cn=workspace-admins,{GROUPS}"}
    conn.search(PEOPLE, "(uid=alice)", attributes=["objectClass", "uidNumber", "homeDirectory"])
    attrs = conn.response[0]["attributes"]
    assert {"inetOrgPerson", "posixAccount"} <= set(attrs["objectClass"])


def test_anonymous_clients_learn_nothing(slapd):
    conn = bind(slapd.url)
    conn.search(DEMO_BASE_DN, "(objectClass=*)", attributes=["*"])
    assert conn.response == [] or all(r.get("type") != "searchResEntry" for r in conn.response)
    assert conn.result["description"] in ("noSuchObject", "success")
    conn.search(GROUPS, "(cn=oncology)", attributes=["member"])
    assert [r for r in conn.response if r.get("type") == "searchResEntry"] == []


def test_passwords_are_stored_hashed_and_readable_by_nobody_but_root(slapd):
    creds = slapd.credentials()
    # another user cannot read alice's password attribute
    conn = bind(slapd.url, f"uid=bob,{PEOPLE}", creds["bob"])
    conn.search(f"uid=alice,{PEOPLE}", "(objectClass=*)", ldap3.BASE, attributes=["userPassword", "cn"])
    assert not conn.response[0]["raw_attributes"].get("userPassword")
    assert conn.response[0]["attributes"]["cn"] == ["Alice Adler"]
    # the root DN sees a salted hash, not the password
    root = bind(slapd.url, slapd.rootdn, slapd.rootpw())
    root.search(f"uid=alice,{PEOPLE}", "(objectClass=*)", ldap3.BASE, attributes=["userPassword"])
    stored = root.response[0]["raw_attributes"]["userPassword"][0].decode()
    assert stored.startswith("{SSHA}")
    assert creds["alice"] not in stored


def test_service_account_reads_memberships_but_not_passwords(slapd):
    conn = bind(slapd.url, slapd.service_dn, slapd.service_password_file.read_text())
    assert members(conn, "data-stewards") == {f"uid=sam,{PEOPLE}", f"uid=tina,{PEOPLE}"}
    conn.search(f"uid=alice,{PEOPLE}", "(objectClass=*)", ldap3.BASE, attributes=["userPassword"])
    assert not conn.response[0]["raw_attributes"].get("userPassword")


def test_state_files_are_private_to_root(slapd):
    for path in (slapd.credentials_file, slapd.conf_path, slapd.rootpw_file, slapd.service_password_file):
        st = path.stat()
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600, path
    assert stat.S_IMODE(slapd.root.stat().st_mode) == 0o700
    assert slapd.credentials_file == slapd.root.parent / "directory" / "demo-credentials.json"


def test_resume_keeps_database_and_passwords(slapd):
    creds = slapd.credentials()
    old_pid = slapd.pid
    slapd.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)
    again = DemoDirectory(slapd.root.parent)
    again.start()
    try:
        assert again.credentials() == creds
        conn = bind(again.url, f"uid=carol,{PEOPLE}", creds["carol"])
        assert members(conn, "oncology") == {f"uid=alice,{PEOPLE}", f"uid=carol,{PEOPLE}"}
    finally:
        again.stop()


def test_restart_of_the_same_object_keeps_the_port(slapd):
    url = slapd.url
    slapd.stop()
    assert not slapd.running
    slapd.start()
    assert slapd.url == url
    bind(url, f"uid=sam,{PEOPLE}", slapd.credentials()["sam"]).unbind()


def test_stop_ends_exactly_our_process_and_the_pid_file_names_it(slapd):
    pid = slapd.pid
    assert int(slapd.pid_file.read_text()) == pid
    cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    assert cmdline[0].endswith(b"slapd") and str(slapd.conf_path).encode() in cmdline
    slapd.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    slapd.stop()  # a second stop is harmless


def test_port_in_use_gives_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Slapd(tmp_path / "d", "dc=x,dc=example", port=port)
        server.configure()
        try:
            with pytest.raises(DirectoryError, match=f"slapd exited .* on port {port}"):
                server.start()
            assert not server.running
        finally:
            server.stop()


def test_add_entries_to_a_running_directory(make_slapd):
    suffix = "dc=x,dc=example"
    server = make_slapd(suffix, ldif_entry(suffix, {"objectClass": ["dcObject", "organization"], "dc": "x", "o": "X"}))
    server.add(
        ldif_entry(
            f"uid=zoe,{suffix}",
            {
                "objectClass": ["inetOrgPerson"],
                "uid": "zoe",
                "cn": "Zoë Zander",
                "sn": "Zander",
                "userPassword": ssha("pässword with spaces "),
            },
        )
    )
    conn = bind(server.url, f"uid=zoe,{suffix}", "pässword with spaces ")
    conn.search(f"uid=zoe,{suffix}", "(objectClass=*)", ldap3.BASE, attributes=["cn"])
    assert conn.response[0]["attributes"]["cn"] == ["Zoë Zander"]
    with pytest.raises(DirectoryError, match="use add"):
        server.load("")


def test_bad_ldif_is_reported_with_the_tool_and_its_message(tmp_path):
    server = Slapd(tmp_path / "d", "dc=x,dc=example")
    server.configure()
    with pytest.raises(DirectoryError, match="slapadd .* failed"):
        server.load("dn: dc=elsewhere,dc=example\nobjectClass: dcObject\ndc: elsewhere\n")


@pytest.mark.parametrize("value", [" leading space", "trailing ", ":colon", "<angle", "Zoë", "nul\x00byte", "a\nb"])
def test_unsafe_ldif_values_are_base64(value):
    line = ldif_entry("cn=x", {"cn": value}).splitlines()[1]
    assert line.startswith("cn:: ")
    assert base64.b64decode(line[5:]).decode() == value


def test_slapd_conf_passes_slaptest_and_contains_the_access_rules(slapd):
    text = slapd.conf_path.read_text()
    assert "access to attrs=userPassword\n    by self write\n    by anonymous auth\n    by * none" in text
    assert "moduleload back_mdb" in text and "database mdb" in text
    subprocess.run(["slaptest", "-f", str(slapd.conf_path), "-u"], check=True, capture_output=True)


def test_die_with_parent_ends_slapd_when_its_starter_is_killed(tmp_path):
    script = (
        "import sys, time\n"
        "from paitient.ops.directory import Slapd\n"
        f"s = Slapd({str(tmp_path / 'd')!r}, 'dc=x,dc=example', die_with_parent=True)\n"
        "s.start(); print(s.pid, flush=True); time.sleep(60)\n"
    )
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        slapd_pid = int(starter.stdout.readline())
        os.kill(slapd_pid, 0)
        starter.kill()  # SIGKILL: no cleanup code runs in the starter
        starter.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(slapd_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(slapd_pid, signal.SIGTERM)
            pytest.fail("slapd outlived the process that started it")
    finally:
        if starter.poll() is None:
            starter.kill()
        starter.stdout.close()
