"""Pure rules of hospital sign-on: which usernames are acceptable, how TLS is chosen, groups -> projects, roles.

The authenticator (:mod:`paitient.hub.auth`) is a thin stateful wrapper around these functions.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ldap3.core.exceptions import LDAPInvalidDnError
from ldap3.utils.dn import parse_dn

from paitient.config import Directory

MAX_USERNAME = 64
USERNAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
UPN_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}@[a-z0-9][a-z0-9.-]{0,189}", re.ASCII)

NO_PROJECT_MESSAGE = (
    "You are not a member of any paitient project. Ask your data integration centre to add you to a project group."
)
UNREACHABLE_MESSAGE = "The hospital directory cannot be reached; try again in a few minutes."
SERVICE_ACCOUNT_MESSAGE = (
    "The workspace cannot look up accounts in the hospital directory right now; "
    "please tell the workspace operator (the service account was refused)."
)
AUDIT_MESSAGE = "Sign-in is paused because the audit trail cannot be written; please tell the workspace operator."


def username_problem(raw: object, *, allow_at: bool = False) -> str | None:
    """Why ``raw`` cannot be a login name, or None when it can.

    The check runs on the name as typed, before lower-casing, so that characters whose lower case is
    ASCII (the Kelvin sign K lower-cases to k) cannot pass as another user. Anything outside
    ``[A-Za-z0-9._-]`` (plus one ``@`` when Active Directory userPrincipalName is the login attribute)
    is refused, which keeps LDAP filter and DN syntax (``* ( ) \\ , = + < > ; "`` and NUL) out entirely.
    """
    if not isinstance(raw, str) or not raw:
        return "empty username"
    if raw != raw.strip():
        return "leading or trailing spaces"
    if not raw.isascii():
        return "non-ASCII characters"
    if len(raw) > (MAX_USERNAME + 191 if allow_at else MAX_USERNAME):
        return "too long"
    pattern = UPN_RE if allow_at and "@" in raw else USERNAME_RE
    if not pattern.fullmatch(raw.lower()):
        return "characters outside a-z 0-9 . _ -" + (" @" if allow_at else "")
    return None


def shown(name: object, limit: int = 32) -> str:
    """A username made safe for logs: repr (control characters escaped) and cut to ``limit`` characters."""
    text = name if isinstance(name, str) else repr(name)
    if len(text) > limit:
        return repr(text[:limit]) + f"...({len(text)} chars)"
    return repr(text)


def actor_name(name: object, limit: int = 64) -> str:
    """The audit actor for a login attempt: the name as typed, cut, never empty."""
    text = name if isinstance(name, str) else repr(name)
    text = text.replace("\x00", "\\x00")
    return (text[:limit] + "...") if len(text) > limit else (text or "(empty)")


@dataclass(frozen=True)
class TlsChoice:
    strategy: str
    """LDAPAuthenticator.tls_strategy: ``before_bind`` (StartTLS), ``on_connect`` (LDAPS) or ``insecure``."""
    port: int
    tls_kwargs: dict


def tls_choice(directory: Directory, url: str | None = None) -> TlsChoice:
    """How to protect the bind for ``directory`` (reached at ``url``, default ``directory.url``).

    ``ldaps://`` URLs and ``tls = "ldaps"`` encrypt from the first byte; ``auto`` means StartTLS except on
    loopback; ``none`` is accepted by the site configuration only for loopback and is checked again here.
    Certificates are always verified (``ca_file`` or the system store).
    """
    import ssl
    from urllib.parse import urlparse

    parsed = urlparse(url or directory.url)
    host = parsed.hostname or ""
    loopback = Directory(url=url or directory.url).is_loopback
    mode = directory.tls
    if parsed.scheme == "ldaps" or mode == "ldaps":
        strategy = "on_connect"
    elif mode == "starttls" or (mode == "auto" and not loopback):
        strategy = "before_bind"
    else:
        if not loopback:
            raise ValueError(
                f"refusing to send passwords in clear text to {host!r}: set [directory] tls to 'starttls' or 'ldaps'"
            )
        strategy = "insecure"
    port = parsed.port or (636 if strategy == "on_connect" else 389)
    kwargs: dict = {}
    if strategy != "insecure":
        kwargs["validate"] = ssl.CERT_REQUIRED
        if directory.ca_file:
            kwargs["ca_certs_file"] = directory.ca_file
    return TlsChoice(strategy=strategy, port=port, tls_kwargs=kwargs)


_DN_ESCAPE = re.compile(r"\\([0-9a-fA-F]{2}|.)", re.DOTALL)


def _unescape_dn_value(value: str) -> str:
    """``\\2C`` and ``\\,`` both stand for ``,``: reduce a value to its characters (RFC 4514)."""
    out = bytearray()
    pos = 0
    for m in _DN_ESCAPE.finditer(value):
        out += value[pos : m.start()].encode("utf-8")
        code = m.group(1)
        out += bytes.fromhex(code) if len(code) == 2 else code.encode("utf-8")
        pos = m.end()
    out += value[pos:].encode("utf-8")
    return out.decode("utf-8", errors="replace")


def normalise_dn(dn: str) -> str:
    """A DN in a form fit for comparison: escapes resolved, names and values lower-cased, spaces trimmed, and
    each attribute's separator kept: ``cn=a+ou=b,...`` (one entry whose name has two values) is not
    ``cn=a,ou=b,...`` (an entry ``cn=a`` in the unit ``ou=b``), or a group made beside the configured one
    under a two-valued name passed for it."""
    try:
        parts = parse_dn(dn, escape=False, strip=True)
    except LDAPInvalidDnError:
        return dn.strip().lower()
    return "".join(
        f"{attr.strip().lower()}={_unescape_dn_value(value.strip()).lower()!r}{sep or ''}" for attr, value, sep in parts
    )


def is_dn(text: str) -> bool:
    return "=" in text


def matching_groups(found: Iterable[str], wanted: Iterable[str], named: Mapping[str, str]) -> set[str]:
    """Which of the configured groups ``wanted`` (full DNs, or plain names) are among the groups ``found`` (their
    DNs) the user is a member of. A plain name counts only as the one group ``named`` gives it (the directory's
    one group of that name, :func:`group_named`): matched against any cn value, any group someone could make
    under the group base, or a second cn value on a team group, passed for it."""
    dns = {normalise_dn(dn) for dn in found}
    out = set()
    for w in wanted:
        dn = w if is_dn(w) else named.get(w)
        if dn is not None and normalise_dn(dn) in dns:
            out.add(w)
    return out


def group_named(name: str, entries: Iterable[str]) -> tuple[str | None, int]:
    """The DN among ``entries`` (those a search for ``cn=<name>`` under the group base found) whose own name is
    exactly ``cn=<name>`` (one value), and how many there are: a group counts by name only when it is the only
    one (the DN itself when there are several)."""
    own = []
    for dn in entries:
        try:
            attr, value, sep = parse_dn(dn, escape=False, strip=True)[0]
        except (LDAPInvalidDnError, IndexError):
            continue
        if attr.strip().lower() == "cn" and sep == "," and _unescape_dn_value(value.strip()).lower() == name.lower():
            own.append(dn)
    return (own[0] if len(own) == 1 else None), len(own)


NO_TOKENS_MESSAGE = (
    "This workspace issues no API tokens to researchers: work in JupyterLab, and take results out through the airlock."
)

OWN_SCOPES = (
    "read:users!user",
    "users:activity!user",
    "servers!user",
    "access:servers!user",
    "read:shares!user",
    "users:shares!user",
)
"""What JupyterHub's ``self`` scope gives a user over their own account, less ``tokens``: a researcher's
roles carry these instead of ``self``, so no role lets them create, list or revoke API tokens."""

BASE_STEWARD_SCOPES = ("self",)
BASE_RESEARCHER_SCOPES = OWN_SCOPES


def role_specs(
    steward_scopes: Iterable[str] = BASE_STEWARD_SCOPES, researcher_scopes: Iterable[str] = BASE_RESEARCHER_SCOPES
) -> dict[str, dict]:
    """The JupyterHub roles the authenticator manages (fresh dicts: JupyterHub annotates them)."""
    return {
        "researcher": {
            "name": "researcher",
            "description": "Member of at least one paitient project: works on the project's data.",
            "scopes": list(dict.fromkeys(researcher_scopes)),
        },
        "steward": {
            "name": "steward",
            "description": "Data steward: reviews what leaves the workspace and reads the audit trail.",
            "scopes": list(dict.fromkeys(steward_scopes)),
        },
    }


@dataclass(frozen=True)
class Membership:
    projects: tuple[str, ...]
    roles: tuple[str, ...]
    admin: bool
    groups: tuple[str, ...]
    """The configured group identifiers the user is in (for LDAPAuthenticator.allowed_groups)."""
    admin_withheld: bool = False
    """In the admin group and in a project: no hub admin (see :func:`membership`)."""

    @property
    def may_sign_in(self) -> bool:
        return bool(self.projects) or "steward" in self.roles or self.admin


def membership(
    in_groups: set[str], project_groups: Mapping[str, str], steward_group: str, admin_group: str
) -> Membership:
    """Projects and paitient roles from the configured groups the user is in.

    A member of a project is no hub admin, whatever the admin group says: JupyterHub's admin role cannot be
    narrowed, and it opens every researcher's server and mints API tokens for anyone, so a researcher holding
    it could run other projects' kernels, or take a steward's token and approve her own release. Whoever
    operates the workspace does so from an account of no project."""
    projects = tuple(sorted(p for p, g in project_groups.items() if g in in_groups))
    roles = []
    if projects:
        roles.append("researcher")
    if steward_group and steward_group in in_groups:
        roles.append("steward")
    in_admin_group = bool(admin_group) and admin_group in in_groups
    admin = in_admin_group and not projects
    if admin:
        roles.append("admin")
    return Membership(
        projects=projects,
        roles=tuple(roles),
        admin=admin,
        groups=tuple(sorted(in_groups)),
        admin_withheld=in_admin_group and not admin,
    )


def hub_roles(
    m: Membership,
    steward_scopes: Iterable[str] = BASE_STEWARD_SCOPES,
    researcher_scopes: Iterable[str] = BASE_RESEARCHER_SCOPES,
) -> list[dict]:
    """The ``roles`` list of the JupyterHub auth model: every role the user holds, ``user`` included
    (JupyterHub strips roles missing from this list, the default ``user`` role too)."""
    specs = role_specs(steward_scopes, researcher_scopes)
    out: list[dict] = [{"name": "user"}]
    out.extend(specs[r] for r in m.roles if r in specs)
    if m.admin:
        out.append({"name": "admin"})
    return out


THROTTLED_NAMES = 10_000
"""Names whose failed sign-ins are kept (the latest failing ones): a flood of new names drops the oldest."""


class SignInThrottle:
    """Failed sign-ins per name: at most ``limit`` within ``pause`` seconds; then the name waits.

    Kept in the hub's memory: a restart of the hub forgets them, which costs an attacker a restart it cannot
    cause. Names are compared as signed in (lower case)."""

    def __init__(self, limit: int, pause: float, clock: Callable[[], float] = time.monotonic):
        self.limit = max(1, int(limit))
        self.pause = float(pause)
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._told: dict[str, float] = {}

    def _recent(self, name: str) -> deque[float]:
        failures = self._failures.get(name)
        if failures is None:
            return deque()
        horizon = self.clock() - self.pause
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            self._failures.pop(name, None)
            self._told.pop(name, None)
        return failures

    def wait(self, name: str) -> float:
        """Seconds before ``name`` may try again (0: now)."""
        failures = self._recent(name)
        if len(failures) < self.limit:
            return 0.0
        return max(0.0, failures[-self.limit] + self.pause - self.clock())

    def first_refusal(self, name: str) -> bool:
        """Whether this is the first attempt refused for ``name`` in its current wait (recorded; the rest are
        not, so that refusals do not fill the audit trail)."""
        until = self._told.get(name)
        now = self.clock()
        if until is not None and now < until:
            return False
        self._told[name] = now + self.wait(name)
        return True

    def failed(self, name: str) -> None:
        failures = self._recent(name)
        failures.append(self.clock())
        while len(failures) > self.limit:
            failures.popleft()
        self._failures[name] = failures
        self._failures.move_to_end(name)
        while len(self._failures) > THROTTLED_NAMES:
            old, _ = self._failures.popitem(last=False)
            self._told.pop(old, None)

    def succeeded(self, name: str) -> None:
        self._failures.pop(name, None)
        self._told.pop(name, None)


class RefusalRecords:
    """Refused sign-ins recorded one by one: at most ``per_window`` in each ``window`` seconds; the others are
    counted, and their count recorded once the window is over (by whoever holds this, see
    :meth:`take`). Refusals need no account, so without a bound anyone who reaches the login form writes to
    the audit trail at the hub's pace; a per-name throttle does not bound ever-new names."""

    def __init__(self, per_window: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.per_window = max(1, int(per_window))
        self.window = float(window)
        self.clock = clock
        self._start: float | None = None
        self._taken = 0
        self._held = 0

    def take(self) -> tuple[bool, bool]:
        """For one refusal: whether it is recorded by itself; and whether it is the first held back since the
        last :meth:`release` (its holder then calls :meth:`release` after :meth:`seconds_left`)."""
        now = self.clock()
        if self._start is None or now >= self._start + self.window:
            self._start, self._taken = now, 0
        if self._taken < self.per_window:
            self._taken += 1
            return True, False
        self._held += 1
        return False, self._held == 1

    def seconds_left(self) -> float:
        """Seconds until the current window is over."""
        return 0.0 if self._start is None else max(0.0, self._start + self.window - self.clock())

    def release(self) -> int:
        """The number of refusals held back since the last release (counted from zero again)."""
        held, self._held = self._held, 0
        return held


def throttled_message(wait: float) -> str:
    minutes = max(1, -(-int(wait) // 60))
    return (
        f"Too many failed sign-ins with this name. Try again in {minutes} minute{'s' if minutes > 1 else ''}; "
        "if you have forgotten your password, ask your hospital's IT service."
    )
