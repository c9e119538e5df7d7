"""A private OpenLDAP server on loopback: the embedded demo hospital directory, and directories for tests.

:class:`Slapd` runs one ``slapd`` as a foreground child (we own its pid) with its own ``slapd.conf``,
database, pid and args files under one folder; it can be loaded with any LDIF, so tests can build
directories with odd names, Active-Directory-like attributes or a service account.
:class:`DemoDirectory` is a :class:`Slapd` seeded with the demo hospital of :mod:`paitient.ops.demo`, with
passwords generated on first start and kept in ``<state_dir>/directory/demo-credentials.json`` (0600).

Access rules: passwords can only be used to bind (``by anonymous auth``) and changed by their owner;
everything else is readable by bound users only, so an anonymous client learns nothing about people or
groups.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from paitient.fsutil import atomic_write_json, atomic_write_text
from paitient.hub.paths import EMBEDDED_SERVICE_DN, HubPaths
from paitient.ops.demo import DEMO_BASE_DN, DEMO_PEOPLE
from paitient.services.kit.process import free_port, parent_death_signal

SCHEMA_DIR = Path("/etc/ldap/schema")
DEFAULT_SCHEMAS = ("core", "cosine", "nis", "inetorgperson")
LOOPBACK = "127.0.0.1"


class DirectoryError(RuntimeError):
    """The private directory could not be configured, loaded or started; the message says why."""


# --------------------------------------------------------------------------------------------------
# Pure helpers: configuration text and LDIF


def slapd_conf(
    *,
    suffix: str,
    rootdn: str,
    rootpw_hash: str,
    db_dir: Path,
    pid_file: Path,
    args_file: Path,
    schema_files: Sequence[Path],
    tls_files: tuple[Path, Path] | None = None,
) -> str:
    """The text of a ``slapd.conf`` for one mdb database with paitient's access rules.

    ``tls_files`` (certificate, key) lets clients use StartTLS.
    """
    includes = "\n".join(f"include {p}" for p in schema_files)
    tls = f"TLSCertificateFile {tls_files[0]}\nTLSCertificateKeyFile {tls_files[1]}\n" if tls_files else ""
    return f"""# Written by paitient; changes are overwritten at the next start.
{includes}
pidfile {pid_file}
argsfile {args_file}
modulepath /usr/lib/ldap
moduleload back_mdb
sizelimit 500
{tls}
database mdb
maxsize 104857600
suffix "{suffix}"
rootdn "{rootdn}"
rootpw {rootpw_hash}
directory {db_dir}
index objectClass eq
index uid,cn eq
index member eq

# Passwords: usable only to bind, changed only by their owner.
access to attrs=userPassword
    by self write
    by anonymous auth
    by * none
# The root DSE and the schema: needed by clients to talk to the server at all.
access to dn.base="" by * read
access to dn.base="cn=Subschema" by * read
# People and groups: bound users only (the authenticator reads group membership after binding).
access to *
    by users read
    by * none
"""


_SAFE_INIT = re.compile(r"^[\x01-\x09\x0b-\x0c\x0e-\x1f\x21-\x39\x3b\x3d-\x7f]")
_SAFE_REST = re.compile(r"^[\x01-\x09\x0b-\x0c\x0e-\x7f]*$")


def _ldif_line(name: str, value: str | bytes) -> str:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    text = raw.decode("ascii", errors="replace") if raw.isascii() else ""
    if raw and raw.isascii() and _SAFE_INIT.match(text) and _SAFE_REST.match(text) and not text.endswith(" "):
        return f"{name}: {text}"
    return f"{name}:: {base64.b64encode(raw).decode('ascii')}"


def ldif_entry(dn: str, attributes: Mapping[str, str | bytes | Iterable[str | bytes]]) -> str:
    """One LDIF record; values that are not LDIF-safe (RFC 2849) are base64-encoded."""
    lines = [_ldif_line("dn", dn)]
    for name, values in attributes.items():
        if isinstance(values, str | bytes):
            values = [values]
        lines.extend(_ldif_line(name, v) for v in values)
    return "\n".join(lines) + "\n"


def ssha(password: str) -> str:
    """``{SSHA}`` hash of ``password`` made by ``slappasswd`` (the secret goes over stdin, not argv)."""
    proc = subprocess.run(
        ["slappasswd", "-h", "{SSHA}", "-T", "/dev/stdin"],
        input=password.encode("utf-8"),
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise DirectoryError(f"slappasswd failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode("ascii").strip()


# --------------------------------------------------------------------------------------------------
# The server


class Slapd:
    """One private ``slapd`` on loopback, all its files under ``root``.

    ``load(ldif)`` adds entries while stopped (``slapadd``), ``add(ldif)`` while running (``ldapadd``
    as the root DN). ``port=0`` picks a free port at the first start; a restart of the same object keeps it.
    ``die_with_parent``: slapd gets SIGTERM if the thread that called ``start()`` dies, even by SIGKILL
    (use it from a long-lived main thread only).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        suffix: str,
        *,
        port: int = 0,
        schemas: Sequence[str | os.PathLike[str]] = DEFAULT_SCHEMAS,
        tls_files: tuple[Path, Path] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.root = Path(root)
        self.die_with_parent = die_with_parent
        self.suffix = suffix
        self.port = port
        self.schema_files = [self._schema_path(s) for s in schemas]
        self.tls_files = tls_files
        self.rootdn = f"cn=admin,{suffix}"
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _schema_path(schema: str | os.PathLike[str]) -> Path:
        p = Path(schema)
        if p.is_absolute():
            return p
        return SCHEMA_DIR / f"{schema}.schema"

    # paths
    @property
    def conf_path(self) -> Path:
        return self.root / "slapd.conf"

    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    @property
    def pid_file(self) -> Path:
        return self.root / "slapd.pid"

    @property
    def log_path(self) -> Path:
        return self.root / "slapd.log"

    @property
    def rootpw_file(self) -> Path:
        return self.root / "rootpw"

    @property
    def url(self) -> str:
        if not self.port:
            raise DirectoryError("the directory has no port yet; call start() first")
        return f"ldap://{LOOPBACK}:{self.port}/"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def rootpw(self) -> str:
        return self.rootpw_file.read_text().strip()

    # setup
    def configure(self) -> None:
        """Write ``slapd.conf`` (0600, it holds the root DN's password hash) and check it with slaptest."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.db_dir.mkdir(exist_ok=True)
        if not self.rootpw_file.exists():
            atomic_write_text(self.rootpw_file, secrets.token_urlsafe(24), mode=0o600)
        missing = [str(p) for p in self.schema_files if not p.is_file()]
        if missing:
            raise DirectoryError(f"schema file(s) not found: {', '.join(missing)}; install slapd (scripts/setup)")
        text = slapd_conf(
            suffix=self.suffix,
            rootdn=self.rootdn,
            rootpw_hash=ssha(self.rootpw()),
            db_dir=self.db_dir,
            pid_file=self.pid_file,
            args_file=self.root / "slapd.args",
            schema_files=self.schema_files,
            tls_files=self.tls_files,
        )
        atomic_write_text(self.conf_path, text, mode=0o600)
        self._run(["slaptest", "-f", str(self.conf_path), "-u"], "slaptest (checking slapd.conf)")

    def is_empty(self) -> bool:
        """True when the database holds no entry (``slapcat`` prints nothing)."""
        if not any(self.db_dir.glob("*.mdb")):
            return True
        out = self._run(["slapcat", "-f", str(self.conf_path), "-a", "(objectClass=*)"], "slapcat")
        return not out.strip()

    def wipe(self) -> None:
        """Remove the database (the server must be stopped)."""
        if self.running:
            raise DirectoryError("stop the directory before wiping its database")
        shutil.rmtree(self.db_dir, ignore_errors=True)
        self.db_dir.mkdir(parents=True)

    def load(self, ldif: str) -> None:
        """Add entries offline with ``slapadd`` (the server must be stopped)."""
        if self.running:
            raise DirectoryError("load() works on a stopped directory; use add() while it runs")
        self._run(["slapadd", "-f", str(self.conf_path), "-q"], "slapadd (loading entries)", ldif)

    def add(self, ldif: str) -> None:
        """Add entries to the running server as the root DN (password from a 0600 file, not argv)."""
        if not self.running:
            raise DirectoryError("add() needs a running directory; start() it or use load()")
        self._run(
            ["ldapadd", "-x", "-H", self.url, "-D", self.rootdn, "-y", str(self.rootpw_file)],
            "ldapadd (adding entries)",
            ldif,
        )

    def _run(self, argv: list[str], what: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            argv, input=stdin.encode("utf-8") if stdin is not None else None, capture_output=True, check=False
        )
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).decode(errors="replace").strip()
            raise DirectoryError(f"{what} failed (exit {proc.returncode}): {err[-2000:]}")
        return proc.stdout.decode(errors="replace")

    # lifecycle
    def start(self, timeout: float = 15.0) -> None:
        """Start ``slapd`` in the foreground as our child and return once it accepts connections."""
        if self.running:
            return
        if not self.conf_path.exists():
            self.configure()
        if not self.port:
            self.port = free_port()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                [
                    "slapd",
                    "-f",
                    str(self.conf_path),
                    "-h",
                    f"ldap://{LOOPBACK}:{self.port}/",
                    "-u",
                    "root",
                    "-g",
                    "root",
                    "-d",
                    "0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=parent_death_signal if self.die_with_parent else None,  # noqa: PLW1509
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise DirectoryError(
                    f"slapd exited with code {code} at start on port {self.port}; "
                    f"see {self.log_path}: {self._log_tail()}"
                )
            if self._pid_file_names(self._proc.pid):  # written once its listener is bound
                try:
                    with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise DirectoryError(f"slapd did not answer on port {self.port} within {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop exactly the slapd this object started (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _pid_file_names(self, pid: int) -> bool:
        try:
            return int(self.pid_file.read_text().strip() or 0) == pid
        except (OSError, ValueError):
            return False

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:].strip()
        except OSError:
            return "(no log)"

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# The demo hospital


def demo_ldif(
    base_dn: str,
    people: Sequence[tuple[str, str, tuple[str, ...], bool]],
    password_hashes: Mapping[str, str],
    service_hash: str | None = None,
) -> str:
    """LDIF of the demo hospital: people (inetOrgPerson + posixAccount) and groupOfNames groups.

    One group per project named in ``people``, ``data-stewards`` and ``workspace-admins``. A groupOfNames
    must have a member, so a group without people lists itself (a DN nobody can bind as). With
    ``service_hash``, a service account ``cn=paitient-service,ou=services`` (reads memberships).
    """
    dc = base_dn.split(",")[0].split("=", 1)[1]
    entries = [
        ldif_entry(base_dn, {"objectClass": ["dcObject", "organization"], "dc": dc, "o": "Demo Hospital"}),
        ldif_entry(f"ou=people,{base_dn}", {"objectClass": "organizationalUnit", "ou": "people"}),
        ldif_entry(f"ou=groups,{base_dn}", {"objectClass": "organizationalUnit", "ou": "groups"}),
    ]
    if service_hash:
        entries.append(ldif_entry(f"ou=services,{base_dn}", {"objectClass": "organizationalUnit", "ou": "services"}))
        entries.append(
            ldif_entry(
                f"cn=paitient-service,ou=services,{base_dn}",
                {
                    "objectClass": ["applicationProcess", "simpleSecurityObject"],
                    "cn": "paitient-service",
                    "userPassword": service_hash,
                },
            )
        )
    groups: dict[str, list[str]] = {}
    for uid_number, (name, full_name, projects, steward) in enumerate(people, start=10001):
        dn = f"uid={name},ou=people,{base_dn}"
        given, _, family = full_name.partition(" ")
        entries.append(
            ldif_entry(
                dn,
                {
                    "objectClass": ["inetOrgPerson", "posixAccount"],
                    "uid": name,
                    "cn": full_name,
                    "givenName": given,
                    "sn": family or given,
                    "mail": f"{name}@{dc}.example",
                    "uidNumber": str(uid_number),
                    "gidNumber": "10000",
                    "homeDirectory": f"/home/{name}",
                    "loginShell": "/usr/sbin/nologin",
                    "userPassword": password_hashes[name],
                },
            )
        )
        for group in (*projects, *(["data-stewards"] if steward else [])):
            groups.setdefault(group, []).append(dn)
    groups.setdefault("data-stewards", [])
    groups.setdefault("workspace-admins", [])
    for group, members in groups.items():
        gdn = f"cn={group},ou=groups,{base_dn}"
        entries.append(ldif_entry(gdn, {"objectClass": "groupOfNames", "cn": group, "member": members or [gdn]}))
    return "\n".join(entries)


class DemoDirectory(Slapd):
    """The embedded demo hospital under ``<state_dir>/directory``; reuses database and passwords on resume."""

    def __init__(self, state_dir: str | os.PathLike[str], port: int = 0, *, die_with_parent: bool = False) -> None:
        super().__init__(Path(state_dir) / "directory", DEMO_BASE_DN, port=port, die_with_parent=die_with_parent)

    @property
    def credentials_file(self) -> Path:
        return self.root / "demo-credentials.json"

    @property
    def seeded_marker(self) -> Path:
        return self.root / "seeded"

    @property
    def service_password_file(self) -> Path:
        """Password of the demo's service account (0600), which the hub uses to re-read memberships."""
        return HubPaths(self.root.parent).embedded_service_password_file

    service_dn = EMBEDDED_SERVICE_DN

    def credentials(self) -> dict[str, str]:
        """Demo username -> password (generated on first start)."""
        return json.loads(self.credentials_file.read_text())

    def start(self, timeout: float = 15.0) -> None:
        if self.running:
            return
        self.configure()
        files = (self.seeded_marker, self.credentials_file, self.service_password_file)
        if not all(f.exists() for f in files) or self.is_empty():
            self.seed()
        super().start(timeout)

    def seed(self) -> None:
        """Create the demo hospital from scratch with new random passwords."""
        self.seeded_marker.unlink(missing_ok=True)
        self.wipe()
        passwords = {name: secrets.token_urlsafe(9) for name, *_ in DEMO_PEOPLE}
        service_password = secrets.token_urlsafe(24)
        atomic_write_json(self.credentials_file, passwords, mode=0o600)
        atomic_write_text(self.service_password_file, service_password, mode=0o600)
        hashes = {n: ssha(p) for n, p in passwords.items()}
        self.load(demo_ldif(DEMO_BASE_DN, DEMO_PEOPLE, hashes, service_hash=ssha(service_password)))
        atomic_write_text(self.seeded_marker, "", mode=0o600)
