"""``[workspace]`` (where and how the workspace runs) and ``[accounts]`` (the researchers' system accounts)."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from traitlets import Bunch, TraitError, validate

from paitient.config.errors import SettingError, must
from paitient.config.model import Model
from paitient.config.traits import ABSOLUTE, Choice, Rule, Text, WholeNumber, at_least

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
"""Project and dataset names: lower-case letters, digits, '-' or '_', starting with a letter, at most 32."""

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


def _known_zone(name: str) -> bool:
    """Whether ``name`` is a zone of the IANA database this machine has."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def origin_problem(url: str) -> str:
    """What is wrong with ``url`` as the workspace's origin (``https://host[:port]``, nothing after; plain
    http only on ``localhost`` and its subdomains), or ``""``."""
    parsed = urlsplit(url.rstrip("/"))
    if parsed.scheme not in ("http", "https"):
        return f"{url!r} does not start with https:// or http://"
    if parsed.username or parsed.password or parsed.path or parsed.query or parsed.fragment:
        return f"{url!r} has more than a scheme, a host and a port"
    host = parsed.hostname or ""
    try:
        parsed.port  # noqa: B018 - raises on a port that is no number or out of range
    except ValueError:
        return f"{url!r} has no usable port"
    labels = host.split(".")
    if not host or not all(_LABEL.match(label) for label in labels):
        return f"{url!r} names no host of DNS labels (lower-case letters, digits and '-')"
    if all(label.isdigit() for label in labels):
        return f"{url!r} names an IP address, which has no subdomains"
    if parsed.scheme == "http" and host != "localhost" and not host.endswith(".localhost"):
        # Browsers send no Sec-Fetch-* headers to a plain-http origin that is not this machine, and without
        # them JupyterHub takes a signed-in GET from any origin for the viewer's own.
        return (
            f"{url!r} is plain http on a name other than localhost, which leaves the stewards' pages open to "
            "other origins' requests; serve it over https (the TLS-terminating reverse proxy), or use "
            "http://localhost:PORT to try it on this machine"
        )
    return ""


class Workspace(Model):
    """Where and how the workspace runs on this machine."""

    section = "workspace"

    state_dir = Text(
        "/var/lib/paitient",
        rule=ABSOLUTE,
        help="All state: hub database, directory (when embedded), services' sockets and stores, audit trail, "
        "accounts registry, published data. Owned by root; users may traverse it (0755) to reach the service "
        "sockets in run/, nothing else.",
    )

    data_root = Text(
        "",
        help="Published datasets (<data_root>/<project>/<dataset>/versions/<N>), read-only to users. "
        "Empty: <state_dir>/data.",
    )
    bind_ip = Text(
        "127.0.0.1",
        help="The address researchers open in their browser (the proxy listens here). Put a TLS-terminating "
        "reverse proxy in front when this is not loopback.",
    )

    @validate("bind_ip")
    def _ip(self, proposal: Bunch) -> str:
        try:
            ipaddress.ip_address(proposal.value)
        except ValueError:
            raise TraitError(f"not an IP address: {proposal.value!r}") from None
        return proposal.value

    port = WholeNumber(8000, help="The port researchers open in their browser (the proxy listens here).")

    subdomain_host = Text(
        "",
        help="The workspace's address as browsers open it (https://HOST[:PORT], no path), to give every origin "
        "its own: the hub at HOST, each researcher's server at <name>.HOST (her sign-in name), each service's pages at "
        "<service>--service.HOST. Then no page a researcher's server sends can act on the stewards' pages (see "
        "docs/security-model.md, 17b). Needs a wildcard DNS name (*.HOST) and, behind TLS, a wildcard "
        "certificate; plain http only for http://localhost:PORT on this machine. Empty: one origin for all, every "
        "part under a path of the workspace's address.",
    )

    @validate("subdomain_host")
    def _subdomain_host(self, proposal: Bunch) -> str:
        value = proposal.value
        if value:
            problem = origin_problem(value)
            if problem:
                raise TraitError(
                    f"{problem}: give https://HOST or https://HOST:PORT, e.g. https://paitient.example.org"
                )
        return value.rstrip("/")

    hub_port = WholeNumber(0, help="The hub's internal API port, on loopback. 0 picks a free port at start.")
    proxy_api_port = WholeNumber(0, help="The proxy's API port, on loopback. 0 picks a free port at start.")

    gateway_uid = WholeNumber(
        0,
        help="Kubernetes: the uid the services' gateway runs as (paitient.services.gateway), the one caller whose "
        "requests may name the pod's caller they are made for. 0: no gateway (a host's workspace); never root.",
    )

    @validate("port", "hub_port", "proxy_api_port")
    def _port(self, proposal: Bunch) -> int:
        low = 1 if proposal.trait.name == "port" else 0
        if not low <= proposal.value <= 65535:
            raise TraitError(f"not a usable port: {proposal.value} (allowed: {low} to 65535)")
        return proposal.value

    key_file = Text(
        "",
        help="The pseudonymisation key (32+ random bytes, root:root 0600). Ingest refuses a key that others can "
        "read. Empty: <state_dir>/keys/pseudonym.key, created on first use.",
    )
    spawner = Choice(
        ("paitient-local", "paitient-docker", "local", "docker"),
        "paitient-local",
        help='How users\' servers run: "paitient-local" (short: "local"), a process of each user\'s system account '
        'in a network namespace of its own; or "paitient-docker" (short: "docker"), the same server as the same '
        "account in a container of its own, on the podman engine that `paitient up` starts under <state_dir>/engine "
        "(needs podman and runc: bash scripts/setup install). Either way kernels run in bubblewrap on the host, "
        "started by the root-side launcher.",
    )

    @validate("spawner")
    def _spawner(self, proposal: Bunch) -> str:
        # the short names stand for the entry points (jupyterhub.spawners) that the hub is given
        return {"local": "paitient-local", "docker": "paitient-docker"}.get(proposal.value, proposal.value)

    min_k = WholeNumber(
        5,
        rule=at_least(1),
        help="Ingest refuses a dataset whose smallest group over its declared quasi-identifiers is smaller "
        "than this (k-anonymity).",
    )

    date_shift_days = WholeNumber(
        180,
        rule=Rule("lie between 1 and 3650", lambda v: 1 <= v <= 3650),
        help="Ingest shifts each patient's dates by a keyed number of days drawn from [-date_shift_days, "
        "+date_shift_days], the same shift for all of a patient's rows and datasets within a project.",
    )

    date_shift_unit = Choice(
        ("day", "week"),
        "day",
        help='What the date offsets are counted in. "week": whole weeks, 1 to date_shift_days // 7 either way '
        "(date_shift_days then at least 7), so every shifted date keeps its weekday: weekday and weekend "
        "effects stay analysable, and a weekday known of a real date (a clinic's operating day) says nothing "
        'of the offset. "day" draws from seven times as many offsets, and changes weekdays.',
    )

    time_zone = Text(
        "",
        rule=Rule(
            "name a time zone of the IANA database, such as Europe/Berlin (or be empty)",
            lambda v: v == "" or _known_zone(v),
        ),
        help="The zone the hospital's clinical times are recorded in (an IANA name, such as Europe/Berlin). "
        "A date_shift column whose times carry a UTC offset (2020-01-10T08:00:00+01:00, or a Parquet timestamp "
        "with a zone) is published as each time's wall clock in this zone, without an offset: shifted by whole "
        "days, an offset or a UTC hour would still tell summer from winter time, and so give the shift away. "
        "Empty: such a column is refused, saying to set this.",
    )

    ledger_url = Text(
        "",
        help="Deprecated: set url in the database table below instead, which moves the hub and every store. "
        "Kept for sites that set it before: the ledger alone in this postgresql://USER@HOST/DATABASE database, "
        "in its default schema, the other stores in SQLite. Not together with the database table's url.",
    )

    @validate("ledger_url")
    def _ledger_url(self, proposal: Bunch) -> str:
        from paitient.config.database import url_problem

        problem = url_problem(proposal.value) if proposal.value else ""
        if problem:
            raise TraitError(problem)
        return proposal.value

    def check(self) -> None:
        if self.date_shift_unit == "week" and self.date_shift_days < 7:
            raise SettingError(
                (),
                "date_shift_days",
                f'must be at least 7 when date_shift_unit is "week" (offsets are then whole weeks), '
                f"got {self.date_shift_days}",
            )


class Accounts(Model):
    """Each signed-in researcher gets a local system account; their server and kernels run as it.

    The name is prefix + the login name reduced to a-z, 0-9 and "-" (at most 32 characters). When that name is
    taken by a system account paitient did not create, by another user, or is reserved (root, nobody, ...), a
    short hash of the login name is appended. Existing system accounts are never reused, except a leftover of an
    earlier state directory made for the same user, which is removed and made anew, empty. `paitient accounts
    list` shows the accounts the workspace made; `paitient accounts prune` removes those nothing wants.
    """

    section = "accounts"

    prefix = Text(
        "pt-", help='Start of every account name: 1-8 lower-case letters, digits or "-", starting with a letter.'
    )

    @validate("prefix")
    def _prefix(self, proposal: Bunch) -> str:
        ok = re.match(r"^[a-z][a-z0-9-]{0,7}\Z", proposal.value) is not None
        must(ok, "be 1-8 lower-case letters, digits or '-', starting with a letter", proposal.value)
        return proposal.value

    home_root = Text("/home", rule=ABSOLUTE, help="Homes are created here, mode 0700, owned by the account.")

    shell = Text("/usr/sbin/nologin", help="Login shell of the accounts.")

    group = Text(
        "paitient-users",
        help="System group of the workspace's accounts (made if missing; the hub adds every account to it). The "
        "sockets of the audit, ledger, airlock and jobs services are root:<group> mode 0660, so no other local "
        "account can connect to them.",
    )

    @validate("group")
    def _group(self, proposal: Bunch) -> str:
        ok = re.match(r"^[a-z_][a-z0-9_-]{0,31}\Z", proposal.value) is not None
        must(ok, "be a system group name: lower-case letters, digits, '_' or '-', at most 32", proposal.value)
        return proposal.value

    uid_min = WholeNumber(
        20000,
        rule=at_least(1000),
        help="paitient's accounts get uids from here up; existing accounts outside paitient's registry are "
        "never reused.",
    )

    max_accounts = WholeNumber(
        10000,
        rule=Rule("be positive", lambda v: v >= 1),
        help="Size of paitient's uid range: uids uid_min to uid_min + max_accounts - 1 (a range that must not "
        "include 65534 and 65535).",
    )

    def check(self) -> None:
        if self.uid_min <= 65535 and self.uid_max >= 65534:
            raise SettingError(
                (),
                None,
                f"uids {self.uid_min}-{self.uid_max} include 65534 (nobody) or 65535; choose uid_min and "
                "max_accounts so the range ends below 65534 or starts above 65535",
            )

    @property
    def uid_max(self) -> int:
        return self.uid_min + self.max_accounts - 1


def service_origin(subdomain_host: str, service: str) -> str:
    """Where a service's pages are served when ``subdomain_host`` (an origin, :func:`origin_problem`) is set:
    ``<scheme>://<service>--service.<host>[:<port>]``, the name JupyterHub's ``idna`` subdomain hook gives a
    service of a plain lower-case name. Empty ``subdomain_host``: ``""`` (the workspace's own origin)."""
    if not subdomain_host:
        return ""
    parsed = urlsplit(subdomain_host)
    return f"{parsed.scheme}://{service}--service.{parsed.netloc}"
