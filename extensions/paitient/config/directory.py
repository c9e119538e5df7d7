"""``[directory]``: the hospital directory (OpenLDAP or Active Directory) that researchers sign in with."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlparse

from traitlets import Bunch, TraitError, validate

from paitient.config.errors import SettingError, must
from paitient.config.model import Model
from paitient.config.traits import POSITIVE, Choice, Flag, Names, Number, Rule, Text, WholeNumber


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and for addresses in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Directory(Model):
    """The hospital directory (OpenLDAP or Active Directory) that researchers sign in with.

    Members of a project's directory group (see [[projects]] group) may sign in and see that project's data;
    members of steward_group may sign in to review outputs; anyone else is refused with a message telling them
    to ask for a project group.
    """

    section = "directory"

    url = Text(
        "",
        help="ldap://host[:port]/ or ldaps://host[:port]/. Empty: `paitient up` starts the embedded demo "
        "directory on loopback (a private slapd under <state_dir>/directory; demo passwords in "
        "demo-credentials.json).",
    )

    @validate("url")
    def _url(self, proposal: Bunch) -> str:
        url = proposal.value
        if url:
            must(urlparse(url).scheme in ("ldap", "ldaps"), "start with ldap:// or ldaps://", url)
            if not urlparse(url).hostname:
                raise TraitError(f"no host in {url!r}")
        return url

    tls = Choice(
        ("auto", "starttls", "ldaps", "none"),
        "auto",
        help="How the password is protected on the wire:\n"
        '- "auto": StartTLS, except for a directory on loopback (127.0.0.0/8, ::1, localhost)\n'
        '- "starttls": StartTLS before the bind (fails closed when the server cannot upgrade)\n'
        '- "ldaps": TLS from the first byte (the default with an ldaps:// url; port 636 unless given)\n'
        '- "none": clear text; refused unless the directory is on loopback\n'
        "Server certificates are always verified, against ca_file or the system's trust store.",
    )
    ca_file = Text("", help="CA certificates (PEM) to verify the directory's certificate; empty: the system's.")
    bind_dn_template = Names(
        help="Bind as the user with a DN built from the login name ({username} is replaced; special characters "
        "are escaped), e.g. uid={username},ou=people,dc=hospital,dc=example. Several templates are tried in "
        "order. Used when lookup_dn is false.",
    )

    @validate("bind_dn_template")
    def _templates(self, proposal: Bunch) -> tuple[str, ...]:
        for template in proposal.value:
            must("{username}" in template, "contain {username} in every template", template)
        return proposal.value

    lookup_dn = Flag(
        False,
        help="Search-then-bind (Active Directory, or DNs that do not contain the login name): a service account "
        "searches search_base for the one entry whose user_attribute equals the login name, then paitient binds "
        "as that entry with the user's password. Zero or several matches: the sign-in is refused.",
    )
    search_base = Text("", help="Where lookup_dn searches for users.")
    user_attribute = Text(
        "uid",
        help='"uid" (OpenLDAP), "sAMAccountName" or "userPrincipalName" (Active Directory; allows one "@").',
    )

    @validate("user_attribute")
    def _attribute(self, proposal: Bunch) -> str:
        if not re.match(r"^[A-Za-z][A-Za-z0-9-]{0,63}\Z", proposal.value):
            raise TraitError(
                f"{proposal.value!r} is not an attribute name; use uid, sAMAccountName or userPrincipalName"
            )
        return proposal.value

    service_dn = Text(
        "",
        help="The service account's DN. It searches for users (lookup_dn) and re-reads every signed-in user's "
        "groups every few minutes, so someone removed from all projects is signed out without waiting for "
        "their cookie to expire. Empty: lookups are anonymous and groups are read at sign-in only. (The "
        "embedded demo directory brings its own service account.)",
    )
    service_password_file = Text(
        "",
        help="A file holding the service account's password (owner root, mode 0600; never put the password in "
        "the site file).",
    )
    group_base = Text(
        "",
        help="Where groups live. Group membership is read from groupOfNames / AD group `member` attributes "
        "holding the user's DN (nested groups are not followed). With group_base set, a project's group may be "
        'given as a plain cn ("Oncology Researchers"): it is then the one group under group_base whose own name '
        "is that cn (a group with a second cn value of it does not count), and a name two groups under "
        "group_base have grants nothing until its full DN is configured (the hub's log says so). Without "
        "group_base, groups must be full DNs.",
    )
    steward_group = Text(
        "",
        help="Members get the steward role: they review airlock requests and read the ledger and audit views. "
        "A steward need not be in any project.",
    )
    admin_group = Text("", help="Members become JupyterHub admins. Empty: nobody is made admin by the directory.")
    active_filter = Text(
        "",
        help="An LDAP filter a user's entry must match to sign in and, at each refresh, to stay signed in: a "
        "disabled account is then treated as one removed from every project (signed out, tokens deleted, server "
        'stopped). Active Directory: "(!(userAccountControl:1.2.840.113556.1.4.803:=2))"; OpenLDAP with the '
        'password policy overlay: "(!(pwdAccountLockedTime=*))"; or an attribute the hospital sets on leavers, '
        'such as "(!(employeeType=left))". Empty: every entry whose password binds.',
    )

    @validate("active_filter")
    def _active_filter(self, proposal: Bunch) -> str:
        value = proposal.value.strip()
        if value:
            from ldap3.operation.search import parse_filter

            must(value.startswith("(") and value.endswith(")"), "be an LDAP filter in parentheses", value)
            try:
                parse_filter(value, None, False, False, None, False)
            except Exception as e:
                raise TraitError(f"{value!r} is not an LDAP filter: {e}") from None
        return value

    timeout = Number(
        5.0,
        rule=Rule("be seconds between 0 and 120", lambda v: 0 < v <= 120),
        help="Seconds to wait for the directory to connect and to answer. When it does not, the login page says "
        "the directory cannot be reached and the hub keeps running.",
    )
    failed_signins = WholeNumber(
        5,
        rule=POSITIVE,
        help="Failed sign-ins (a wrong password, or a name the directory does not know) one name may have within "
        "failed_signin_pause seconds; the next attempts with that name are refused without asking the "
        "directory until the oldest of them is that old, saying when to try again. Password guessing through "
        "the workspace then cannot lock the hospital account (the directory's own lockout counts only the "
        "attempts that reach it), nor fill the audit trail with refusals: one is recorded per pause.",
    )
    failed_signin_pause = Number(
        300.0,
        rule=Rule("be seconds between 1 and 86400", lambda v: 1 <= v <= 86400),
        help="The window of failed_signins, in seconds.",
    )
    refusals_recorded = WholeNumber(
        60,
        rule=POSITIVE,
        help="Refused sign-ins (any name, any reason before the directory says who it is) recorded in the audit "
        "trail one by one in a minute; the others of that minute are recorded as one record with their count. "
        "Refusals need no account: without this bound, anyone who reaches the login form could fill the disk "
        "of the audit trail, whose being full stops every researcher's cells, at the hub's pace.",
    )
    refresh_seconds = Number(
        300.0,
        rule=Rule("be seconds between 0 and 86400", lambda v: 0 <= v <= 86400),
        help="How often a signed-in user's projects and roles are read again from the directory (with the service "
        "account), on their next request after that (their server's own checks with the hub included): a user "
        "taken out of every project, or a steward out of the steward group with no project, is signed out, every "
        "token they hold is deleted and their server stopped; one who became a researcher loses any API token they "
        "held. 0: only when they sign in.",
    )

    def check(self) -> None:
        if not self.url:
            return
        if self.tls == "none" and not self.is_loopback:
            raise SettingError(
                (),
                "tls",
                f"'none' sends passwords in clear text; it is allowed only for a directory on loopback, "
                f"not {self.host!r}. Use 'starttls' or 'ldaps'.",
            )
        if self.lookup_dn and not self.search_base:
            raise SettingError((), "search_base", "lookup_dn = true needs search_base")
        if not self.lookup_dn and not self.bind_dn_template:
            raise SettingError(
                (),
                None,
                "url is set and needs bind_dn_template (e.g. 'uid={username},ou=people,dc=...') "
                "or lookup_dn = true with search_base and a service account",
            )

    @property
    def embedded(self) -> bool:
        return not self.url

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or ""

    @property
    def port(self) -> int:
        parsed = urlparse(self.url)
        return parsed.port or (636 if parsed.scheme == "ldaps" else 389)

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)
