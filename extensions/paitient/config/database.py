"""``[database]``: where the hub and the root-side services keep their state.

Empty (the default): each keeps a SQLite file under ``<state_dir>``, as the embedded workspace does. A
``postgresql://`` URL: the hub, the ledger, the airlock, the jobs queue and the egress counts live in that
one PostgreSQL database, each in a schema of its own (:data:`SCHEMAS`), so one role, one ``.pgpass`` line and
one ``pg_dump`` cover them. The URL never carries a password: libpq reads it from ``~root/.pgpass``, or from
the file ``passfile`` names (the same format), in every process that connects: services, hub, the hub's
``upgrade-db``, ``pg_dump``.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit

from traitlets import Bunch, TraitError, validate

from paitient.config.model import Model
from paitient.config.traits import Rule, Text

SCHEMAS = {"hub": "hub", "ledger": "ledger", "airlock": "airlock", "jobs": "jobs", "egress": "egress"}
"""Store -> its PostgreSQL schema within ``[database] url``'s database."""

SCHEMES = ("postgresql", "postgres")
_PARAMS = frozenset(
    {
        "host",
        "port",
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslcrl",
        "connect_timeout",
        "application_name",
        "target_session_attrs",
        "gssencmode",
        "krbsrvname",
        "service",
    }
)


def url_problem(url: str) -> str:
    """What is wrong with a PostgreSQL URL for the site file, or "" when it is usable."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as e:
        return f"not a URL ({e}); write postgresql://USER@HOST[:PORT]/DATABASE"
    if parts.scheme not in SCHEMES:
        return (
            f"scheme {parts.scheme or '(none)'!r} is not PostgreSQL; write postgresql://USER@HOST[:PORT]/DATABASE, "
            "or leave it empty for SQLite"
        )
    if parts.password is not None:
        return (
            "the URL holds a password; remove it and put it in ~root/.pgpass (host:port:database:user:password, "
            "mode 0600) or in the file [database] passfile names"
        )
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        return "name the database after the host: postgresql://USER@HOST[:PORT]/DATABASE"
    if not parts.username:
        return "name the role before the host: postgresql://USER@HOST[:PORT]/DATABASE"
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    if "password" in params:
        return "the URL holds a password; put it in ~root/.pgpass or the file [database] passfile names"
    if "passfile" in params or "options" in params:
        return "leave passfile and options out of the URL: set [database] passfile; paitient sets the options"
    unknown = sorted(set(params) - _PARAMS)
    if unknown:
        return f"unknown URL parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(_PARAMS))}"
    if not parts.hostname and not params.get("host"):
        return "name the server: postgresql://USER@HOST/DATABASE, or a socket folder: ...?host=/run/postgresql"
    return ""


class Database(Model):
    """Where the hub and the services keep their state: SQLite files under <state_dir> (empty url), or one
    PostgreSQL database with a schema per store (hub, ledger, airlock, jobs, egress). The audit trail stays in
    hash-chained files under <state_dir>/audit."""

    section = "database"

    url = Text(
        "",
        help="Empty: SQLite files under <state_dir> (root only). Or postgresql://USER@HOST[:PORT]/DATABASE "
        "(?sslmode=verify-full&sslrootcert=..., or ?host=/run/postgresql for a local socket): the hub, the ledger, "
        "the airlock, the jobs queue and the egress counts in that database, each in its own schema, made and "
        "upgraded at start. Never a password here: libpq reads ~root/.pgpass, or set passfile.",
    )

    @validate("url")
    def _url(self, proposal: Bunch) -> str:
        problem = url_problem(proposal.value) if proposal.value else ""
        if problem:
            raise TraitError(problem)
        return proposal.value

    passfile = Text(
        "",
        rule=Rule("be empty or an absolute path", lambda v: not v or v.startswith("/")),
        help="A password file in libpq's .pgpass format (HOST:PORT:DATABASE:USER:PASSWORD lines; owner root, "
        "mode 0600). Empty: ~root/.pgpass, or no password for peer or certificate authentication.",
    )

    def schema(self, store: str) -> str:
        """The PostgreSQL schema of ``store`` (``hub``, ``ledger``, ``airlock``, ``jobs``, ``egress``)."""
        return SCHEMAS[store]
