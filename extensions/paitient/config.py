"""The site configuration: one TOML file that says who may sign in, which projects exist, what data they see.

Every part of paitient (hub, spawner, sandbox, services, ingest) reads the same validated object, so a
setting means one thing everywhere. Validation is strict: an unknown key or a bad value is named in the
error together with what would be accepted, and nothing starts on a configuration that does not validate.

The file is read by root-side processes only and must not be writable by anyone else (see
:func:`check_owner`). Every key is documented in ``hub_config/site.example.toml``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

EMBEDDED_SITE = Path(__file__).with_name("embedded_site.toml")
"""The embedded default: a demo directory and two demo projects (``paitient up`` without ``--site``)."""

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class ConfigError(ValueError):
    """The site configuration is invalid; the message names the key and says what to change."""


@dataclass(frozen=True)
class Budget:
    """A total differential-privacy budget for one dataset of one project."""

    epsilon: float = 10.0
    delta: float = 1e-5


@dataclass(frozen=True)
class Project:
    name: str
    group: str
    """Directory group whose members are the project's researchers (full DN, or a group name)."""
    datasets: tuple[str, ...] = ()
    stewards: tuple[str, ...] = ()
    """Directory usernames of the data stewards who review this project's outputs."""
    approvals: int = 1
    """Independent steward approvals an airlock request needs (1 or 2)."""
    auto_release: tuple[str, ...] = ()
    """Airlock kinds released without review when every automatic check passed."""
    budget: Budget = field(default_factory=Budget)
    """Default budget for each dataset of the project."""
    budgets: dict[str, Budget] = field(default_factory=dict)
    """Per-dataset overrides of ``budget``."""
    description: str = ""

    def budget_for(self, dataset: str) -> Budget:
        return self.budgets.get(dataset, self.budget)


@dataclass(frozen=True)
class Directory:
    """The hospital directory (LDAP or Active Directory).

    With ``url`` empty, ``paitient up`` starts an embedded demo directory on loopback.
    """

    url: str = ""
    bind_dn_template: tuple[str, ...] = ()
    """e.g. ``uid={username},ou=people,dc=hospital,dc=example``; used when ``lookup_dn`` is false."""
    lookup_dn: bool = False
    """Search for the user's DN with a service account, then bind as the user (Active Directory)."""
    search_base: str = ""
    user_attribute: str = "uid"
    """``uid`` for OpenLDAP, ``sAMAccountName`` or ``userPrincipalName`` for Active Directory."""
    service_dn: str = ""
    service_password_file: str = ""
    """Root-only file holding the service account's password (never put the password here)."""
    tls: str = "auto"
    """``auto`` (StartTLS except on loopback), ``starttls``, ``ldaps``, or ``none`` (loopback only)."""
    ca_file: str = ""
    group_base: str = ""
    """Where group objects live; membership is read from ``member`` attributes (groupOfNames)."""
    steward_group: str = ""
    """Members get the steward role (review airlock requests, read the ledger and audit views)."""
    admin_group: str = ""
    """Members get JupyterHub's admin role."""
    timeout: float = 5.0

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
        return _is_loopback(self.host)


@dataclass(frozen=True)
class Accounts:
    """Local system accounts created for signed-in users."""

    prefix: str = "pt-"
    home_root: str = "/home"
    shell: str = "/usr/sbin/nologin"
    uid_min: int = 20000
    """Accounts get uids from here up; existing accounts outside paitient's registry are never reused."""
    max_accounts: int = 10000
    """Size of paitient's uid range: uids ``uid_min`` to ``uid_min + max_accounts - 1``."""

    @property
    def uid_max(self) -> int:
        return self.uid_min + self.max_accounts - 1


@dataclass(frozen=True)
class Sandbox:
    """Limits for each researcher kernel."""

    memory_mb: int = 4096
    max_processes: int = 256
    max_open_files: int = 1024
    cpu_seconds: int = 0
    """CPU time limit per kernel; 0 means none."""


@dataclass(frozen=True)
class Server:
    output_cap_message_bytes: int = 1_000_000
    """Output sent to the browser is cut after this many bytes per message."""
    output_cap_execution_bytes: int = 5_000_000
    """... and after this many bytes per cell execution."""
    contents_cap_bytes: int = 20_000_000
    """The server's contents API does not open or send files larger than this (they stay in the home)."""
    idle_timeout: int = 3600
    """Seconds after which an idle kernel is shut down, and then a server with no kernels and no
    activity stops itself; 0: never."""


@dataclass(frozen=True)
class Workspace:
    state_dir: str = "/var/lib/paitient"
    data_root: str = ""
    """Published datasets, read-only to users. Empty: ``<state_dir>/data``."""
    bind_ip: str = "127.0.0.1"
    port: int = 8000
    hub_port: int = 0
    """Internal hub API port; 0 picks a free one."""
    proxy_api_port: int = 0
    key_file: str = ""
    """Pseudonymisation key (root-only, 0600). Empty: ``<state_dir>/keys/pseudonym.key``."""
    spawner: str = "paitient-local"
    """``paitient-local``: a system account per user, kernels in bubblewrap."""
    min_k: int = 5
    """Ingest refuses a dataset whose smallest quasi-identifier group is smaller than this."""
    date_shift_days: int = 180
    """Ingest moves each patient's dates by a keyed offset of 1 to this many days, either direction."""
    ledger_url: str = ""
    """Privacy ledger database. Empty: SQLite at ``<state_dir>/ledger/ledger.sqlite3``; or
    ``postgresql://...`` (needs the psycopg package)."""


@dataclass(frozen=True)
class Audit:
    """The audit trail under ``<state_dir>/audit``."""

    rotate_bytes: int = 64 << 20
    """Start a new trail file when the current one reaches this size (the chain carries over)."""
    user_string_chars: int = 65536
    """Strings in events from users' servers and kernels (e.g. a cell's code) are cut here; the record
    keeps the full length and SHA-256."""
    user_details_bytes: int = 262144
    """Details of a user-side event larger than this (as JSON) are replaced by their length and SHA-256."""


@dataclass(frozen=True)
class Airlock:
    """Automatic checks of the airlock (the only way out of the workspace)."""

    max_bytes: int = 512 << 20
    """Largest file the airlock takes."""
    min_count: int = 10
    """Minimum number of individuals behind a table cell."""
    nk_n: int = 2
    """Dominance rule: the ``nk_n`` largest contributors ..."""
    nk_k: float = 0.9
    """... may make up at most this share of a cell's total."""
    p_ratio: float = 0.1
    """p-ratio rule: the contributors after the largest two must make up at least this share of the largest."""
    zeros_disclosive: bool = True
    """Treat zero cells as disclosive (a zero tells that nobody in the group has the property)."""
    mia_max_auc: float = 0.6
    """Model weights fail the membership-inference audit above this attack AUC ..."""
    mia_max_advantage: float = 0.2
    """... or above this attack advantage (max TPR - FPR)."""
    audit_account: str = "nobody"
    """Unprivileged account the membership-inference audit runs as (in the kernels' sandbox)."""
    audit_timeout: float = 600.0
    """Seconds the membership-inference audit may take."""


@dataclass(frozen=True)
class SiteConfig:
    workspace: Workspace = field(default_factory=Workspace)
    directory: Directory = field(default_factory=Directory)
    accounts: Accounts = field(default_factory=Accounts)
    sandbox: Sandbox = field(default_factory=Sandbox)
    server: Server = field(default_factory=Server)
    audit: Audit = field(default_factory=Audit)
    airlock: Airlock = field(default_factory=Airlock)
    projects: tuple[Project, ...] = ()
    source: str = ""
    """Path the configuration was read from (empty for the embedded default)."""

    @property
    def state_dir(self) -> Path:
        return Path(self.workspace.state_dir)

    @property
    def data_root(self) -> Path:
        return Path(self.workspace.data_root or self.state_dir / "data")

    @property
    def key_file(self) -> Path:
        return Path(self.workspace.key_file or self.state_dir / "keys" / "pseudonym.key")

    @property
    def run_dir(self) -> Path:
        """Unix sockets of the services; bound read-only into every sandbox at the same path."""
        return self.state_dir / "run"

    def project(self, name: str) -> Project:
        for p in self.projects:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.projects) or "none"
        raise KeyError(f"no project {name!r} in the site configuration (projects: {known})")


# --------------------------------------------------------------------------------------------------
# Parsing


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _coerce(section: str, name: str, value: Any, default: Any) -> Any:
    where = f"[{section}] {name}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{where}: unsupported value {value!r}")


def _section(cls: type, section: str, raw: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table, got {raw!r}")
    instance = cls() if cls is not Project else None
    known = {f.name: f for f in fields(cls) if f.name not in skip}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"[{section}] unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        default = getattr(instance, key) if instance is not None else _PROJECT_DEFAULTS[key]
        out[key] = _coerce(section, key, value, default)
    return out


_PROJECT_DEFAULTS: dict[str, Any] = {
    "name": "",
    "group": "",
    "datasets": (),
    "stewards": (),
    "approvals": 1,
    "auto_release": (),
    "description": "",
}

AIRLOCK_KINDS = ("table", "figure", "weights", "other")


def _budget(where: str, raw: Any) -> Budget:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table with epsilon and delta, got {raw!r}")
    values = _section(Budget, where.strip("[]"), raw)
    budget = Budget(**values)
    if not budget.epsilon > 0:
        raise ConfigError(f"{where} epsilon: must be positive, got {budget.epsilon}")
    if not 0 < budget.delta < 1:
        raise ConfigError(f"{where} delta: must lie between 0 and 1, got {budget.delta}")
    return budget


def _project(index: int, raw: Any) -> Project:
    section = f"projects.{index}"
    if not isinstance(raw, dict):
        raise ConfigError(f"[[projects]] entry {index} must be a table")
    raw = dict(raw)
    budget_raw = raw.pop("budget", None)
    budgets_raw = raw.pop("budgets", {})
    values = _section(Project, section, raw, skip=("budget", "budgets"))
    for required in ("name", "group"):
        if not values.get(required):
            raise ConfigError(f"[[projects]] entry {index}: {required!r} is required")
    name = values["name"]
    section = f"projects.{name}"
    if not NAME_RE.match(name):
        raise ConfigError(
            f"[{section}] name: {name!r} must be lower-case letters, digits, '-' or '_', "
            "starting with a letter, at most 32 characters"
        )
    for ds in values.get("datasets", ()):
        if not NAME_RE.match(ds):
            raise ConfigError(f"[{section}] datasets: {ds!r} is not a valid dataset name")
    if values.get("approvals", 1) not in (1, 2):
        raise ConfigError(f"[{section}] approvals: must be 1 or 2, got {values['approvals']}")
    for kind in values.get("auto_release", ()):
        if kind not in AIRLOCK_KINDS:
            raise ConfigError(f"[{section}] auto_release: unknown kind {kind!r}; kinds: {', '.join(AIRLOCK_KINDS)}")
    if budget_raw is not None:
        values["budget"] = _budget(f"[{section}.budget]", budget_raw)
    if not isinstance(budgets_raw, dict):
        raise ConfigError(f"[{section}.budgets] must be a table of dataset = {{epsilon, delta}}")
    budgets = {}
    for ds, b in budgets_raw.items():
        if ds not in values.get("datasets", ()):
            raise ConfigError(f"[{section}.budgets] {ds!r} is not one of the project's datasets")
        budgets[ds] = _budget(f"[{section}.budgets.{ds}]", b)
    values["budgets"] = budgets
    return Project(**values)


def _validate(cfg: SiteConfig) -> None:
    d = cfg.directory
    if d.url:
        scheme = urlparse(d.url).scheme
        if scheme not in ("ldap", "ldaps"):
            raise ConfigError(f"[directory] url: must start with ldap:// or ldaps://, got {d.url!r}")
        if not d.host:
            raise ConfigError(f"[directory] url: no host in {d.url!r}")
        if d.tls not in ("auto", "starttls", "ldaps", "none"):
            raise ConfigError(f"[directory] tls: one of auto, starttls, ldaps, none; got {d.tls!r}")
        if d.tls == "none" and not d.is_loopback:
            raise ConfigError(
                f"[directory] tls = 'none' sends passwords in clear text; it is allowed only for a "
                f"directory on loopback, not {d.host!r}. Use 'starttls' or 'ldaps'."
            )
        if d.lookup_dn:
            if not d.search_base:
                raise ConfigError("[directory] lookup_dn = true needs search_base")
        elif not d.bind_dn_template:
            raise ConfigError(
                "[directory] needs bind_dn_template (e.g. 'uid={username},ou=people,dc=...') "
                "or lookup_dn = true with search_base and a service account"
            )
        for t in d.bind_dn_template:
            if "{username}" not in t:
                raise ConfigError(f"[directory] bind_dn_template {t!r} must contain {{username}}")
    if not re.match(r"^[A-Za-z][A-Za-z0-9-]{0,63}\Z", d.user_attribute):
        raise ConfigError(
            f"[directory] user_attribute: {d.user_attribute!r} is not an attribute name; "
            "use uid, sAMAccountName or userPrincipalName"
        )
    if not 0 < d.timeout <= 120:
        raise ConfigError(f"[directory] timeout: seconds between 0 and 120, got {d.timeout}")
    names = [p.name for p in cfg.projects]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"[[projects]] names must be unique; repeated: {', '.join(sorted(dupes))}")
    a = cfg.accounts
    if not re.match(r"^[a-z][a-z0-9-]{0,7}$", a.prefix):
        raise ConfigError(
            f"[accounts] prefix: {a.prefix!r} must be 1-8 lower-case letters, digits or '-', starting with a letter"
        )
    if not a.home_root.startswith("/"):
        raise ConfigError(f"[accounts] home_root: must be an absolute path, got {a.home_root!r}")
    if a.uid_min < 1000:
        raise ConfigError(f"[accounts] uid_min: must be at least 1000, got {a.uid_min}")
    if a.max_accounts < 1:
        raise ConfigError(f"[accounts] max_accounts: must be positive, got {a.max_accounts}")
    if a.uid_min <= 65535 and a.uid_max >= 65534:
        raise ConfigError(
            f"[accounts] uids {a.uid_min}-{a.uid_max} include 65534 (nobody) or 65535; "
            "choose uid_min and max_accounts so the range ends below 65534 or starts above 65535"
        )
    w = cfg.workspace
    for name in ("port", "hub_port", "proxy_api_port"):
        v = getattr(w, name)
        if not 0 <= v <= 65535 or (name == "port" and v == 0):
            raise ConfigError(f"[workspace] {name}: not a usable port: {v}")
    try:
        ipaddress.ip_address(w.bind_ip)
    except ValueError:
        raise ConfigError(f"[workspace] bind_ip: not an IP address: {w.bind_ip!r}") from None
    if not w.state_dir.startswith("/"):
        raise ConfigError(f"[workspace] state_dir: must be an absolute path, got {w.state_dir!r}")
    if w.ledger_url and not w.ledger_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"[workspace] ledger_url: empty (SQLite) or a postgresql:// URL, got {w.ledger_url[:40]!r}")
    if w.spawner not in ("paitient-local",):
        raise ConfigError(f"[workspace] spawner: only 'paitient-local' is available, got {w.spawner!r}")
    if w.min_k < 1:
        raise ConfigError(f"[workspace] min_k: must be at least 1, got {w.min_k}")
    if not 1 <= w.date_shift_days <= 3650:
        raise ConfigError(f"[workspace] date_shift_days: must lie between 1 and 3650, got {w.date_shift_days}")
    s = cfg.sandbox
    for name in ("memory_mb", "max_processes", "max_open_files"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"[sandbox] {name}: must be positive, got {getattr(s, name)}")
    if s.cpu_seconds < 0:
        raise ConfigError("[sandbox] cpu_seconds: must be 0 (no limit) or positive")
    if cfg.server.contents_cap_bytes <= 0:
        raise ConfigError("[server] contents_cap_bytes: must be positive")
    al = cfg.airlock
    for name in ("max_bytes", "min_count", "nk_n", "audit_timeout"):
        if getattr(al, name) <= 0:
            raise ConfigError(f"[airlock] {name}: must be positive, got {getattr(al, name)}")
    for name in ("nk_k", "p_ratio", "mia_max_advantage"):
        if not 0 < getattr(al, name) <= 1:
            raise ConfigError(f"[airlock] {name}: must lie in (0, 1], got {getattr(al, name)}")
    if not 0.5 < al.mia_max_auc <= 1:
        raise ConfigError(f"[airlock] mia_max_auc: must lie in (0.5, 1] (0.5 is guessing), got {al.mia_max_auc}")
    if cfg.server.idle_timeout < 0:
        raise ConfigError(f"[server] idle_timeout: 0 (never) or a number of seconds, got {cfg.server.idle_timeout}")
    if cfg.server.output_cap_message_bytes <= 0 or cfg.server.output_cap_execution_bytes <= 0:
        raise ConfigError("[server] output caps must be positive")
    au = cfg.audit
    if au.rotate_bytes < 4096:
        raise ConfigError(f"[audit] rotate_bytes: must be at least 4096, got {au.rotate_bytes}")
    if au.user_string_chars < 64 or au.user_details_bytes < 1024:
        raise ConfigError("[audit] user_string_chars must be >= 64 and user_details_bytes >= 1024")


SECTIONS = {
    "workspace": Workspace,
    "directory": Directory,
    "accounts": Accounts,
    "sandbox": Sandbox,
    "server": Server,
    "audit": Audit,
    "airlock": Airlock,
}


def parse(raw: dict[str, Any], source: str = "", overrides: dict[str, dict[str, Any]] | None = None) -> SiteConfig:
    """Build a validated :class:`SiteConfig` from a parsed TOML document."""
    raw = dict(raw)
    unknown = set(raw) - set(SECTIONS) - {"projects"}
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(sorted(unknown))}; sections: {', '.join(sorted([*SECTIONS, 'projects']))}"
        )
    kwargs: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = _section(cls, name, raw.get(name, {}))
        values.update((overrides or {}).get(name, {}))
        kwargs[name] = cls(**values)
    projects_raw = raw.get("projects", [])
    if not isinstance(projects_raw, list):
        raise ConfigError("projects must be an array of tables: [[projects]]")
    kwargs["projects"] = tuple(_project(i, p) for i, p in enumerate(projects_raw))
    cfg = SiteConfig(**kwargs, source=source)
    _validate(cfg)
    return cfg


def load(path: str | os.PathLike[str] | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> SiteConfig:
    """Read and validate the site configuration; ``None`` gives the embedded demo default."""
    if path is None:
        return parse(tomllib.loads(EMBEDDED_SITE.read_text(encoding="utf-8")), source="", overrides=overrides)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"site configuration {p} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"site configuration {p} is not UTF-8 text: {e}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"site configuration {p} is not valid TOML: {e}") from None
    return parse(raw, source=str(p.resolve()), overrides=overrides)


def check_owner(path: Path, *, secret: bool = False) -> None:
    """Refuse a file that a non-root user could change (or, if ``secret``, read)."""
    st = path.stat()
    if st.st_uid != 0:
        raise ConfigError(f"{path} must be owned by root (owner uid is {st.st_uid}); run: chown root {path}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{path} is writable by group or others; run: chmod go-w {path}")
    if secret and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"it must be readable by root only: chmod 600 {path}"
        )
