"""Several bind-DN templates: one login name under two of them is refused, not merged (real slapd)."""

import os

import pytest

from paitient.config import ConfigError, parse
from paitient.ops.directory import ldif_entry, ssha
from tests.hub.test_auth_search import SERVICE_DN, SERVICE_PASSWORD, hub_user, sign_in

BASE = "dc=clinic,dc=example"
STAFF = f"ou=Staff,{BASE}"
EXTERNAL = f"ou=External,{BASE}"
GROUPS = f"ou=Groups,{BASE}"

# (ou, uid, password, groups): two people named "bob", and one "erin" only among the external staff
PEOPLE = [
    (STAFF, "bob", "staff-bob-pw", ["oncology", "stewards"]),
    (EXTERNAL, "bob", "external-bob-pw", ["cardio"]),
    (EXTERNAL, "erin", "erin-pw", ["cardio"]),
]


def clinic_ldif() -> str:
    entries = [ldif_entry(BASE, {"objectClass": ["dcObject", "organization"], "dc": "clinic", "o": "Clinic"})]
    entries += [
        ldif_entry(f"ou={ou},{BASE}", {"objectClass": "organizationalUnit", "ou": ou})
        for ou in ("Staff", "External", "Groups", "Service Accounts")
    ]
    entries.append(
        ldif_entry(
            SERVICE_DN.replace("dc=corp,dc=example", BASE),
            {"objectClass": ["applicationProcess", "simpleSecurityObject"], "cn": "paitient-svc"}
            | {"userPassword": ssha(SERVICE_PASSWORD)},
        )
    )
    members: dict[str, list[str]] = {}
    for ou, uid, password, groups in PEOPLE:
        dn = f"uid={uid},{ou}"
        entries.append(
            ldif_entry(
                dn, {"objectClass": "inetOrgPerson", "uid": uid, "cn": uid, "sn": uid, "userPassword": ssha(password)}
            )
        )
        for g in groups:
            members.setdefault(g, []).append(dn)
    entries += [
        ldif_entry(f"cn={g},{GROUPS}", {"objectClass": "groupOfNames", "cn": g, "member": dns})
        for g, dns in members.items()
    ]
    return "\n".join(entries)


@pytest.fixture
def clinic_auth(make_slapd, tmp_path, make_authenticator):
    server = make_slapd(BASE, clinic_ldif(), name="clinic")
    password_file = tmp_path / "service-password"
    password_file.write_text(SERVICE_PASSWORD + "\n")
    os.chmod(password_file, 0o600)

    def make(service: bool = True):
        directory = {
            "url": server.url,
            "tls": "none",
            "bind_dn_template": [f"uid={{username}},{STAFF}", f"uid={{username}},{EXTERNAL}"],
            "group_base": GROUPS,
            "steward_group": f"cn=stewards,{GROUPS}",
        }
        if service:
            directory |= {
                "service_dn": SERVICE_DN.replace("dc=corp,dc=example", BASE),
                "service_password_file": str(password_file),
            }
        site = parse(
            {
                "workspace": {"state_dir": str(tmp_path / "state")},
                "directory": directory,
                "projects": [
                    {"name": "oncology", "group": f"cn=oncology,{GROUPS}"},
                    {"name": "cardiometabolic", "group": f"cn=cardio,{GROUPS}"},
                ],
            }
        )
        return make_authenticator(site)

    return make


@pytest.mark.parametrize("service", [True, False], ids=["service-account", "own-connection"])
async def test_one_name_under_two_templates_is_refused_for_both_people(clinic_auth, service, caplog):
    # Either bob would become hub user "bob": one system account, one home, one server, and at the
    # next refresh the first template's groups (the staff bob's projects and steward role) for both.
    auth = clinic_auth(service)
    assert await sign_in(auth, "bob", "external-bob-pw") is None
    assert await sign_in(auth, "bob", "staff-bob-pw") is None
    assert "'bob' has entries under 2 bind_dn_templates" in caplog.text
    assert "sign-in refused for 'bob': a name under several bind_dn_templates" in caplog.text
    erin = await sign_in(auth, "erin", "erin-pw")  # a name under one template only signs in under it
    assert erin["groups"] == ["cardiometabolic"] and erin["auth_state"]["dn"] == f"uid=erin,{EXTERNAL}"


async def test_a_refresh_of_a_name_under_two_templates_signs_out(clinic_auth):
    auth = clinic_auth()
    assert await auth.refresh_user(hub_user("bob")) is False
    assert (await auth.refresh_user(hub_user("erin")))["groups"] == ["cardiometabolic"]


def test_an_active_filter_that_is_not_a_filter_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="active_filter.*is not an LDAP filter"):
        parse({"directory": {"active_filter": "(!(employeeType=left)"}})
