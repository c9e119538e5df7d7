"""A root-side store's database through SQLAlchemy: a SQLite file under the state directory (the embedded
default) or one schema of the site's PostgreSQL database; its tables made and upgraded by the store's alembic
migrations.

Transactions are explicit and the same on both: a write is ``BEGIN IMMEDIATE`` on SQLite (one writer at a
time; WAL, ``synchronous=FULL`` unless the store asks for less: a transaction that returned is on disk, a
process killed mid-write leaves the last committed state; a store that asks for less asks PostgreSQL for
``synchronous_commit = off`` too); on PostgreSQL ``BEGIN`` and then
``LOCK TABLE <the store's tables> IN SHARE ROW EXCLUSIVE MODE``, which serialises the store's writers the
same way while readers go on. A read sees one snapshot (``BEGIN`` on SQLite, ``REPEATABLE READ, READ ONLY`` on
PostgreSQL).

Opening a store brings its tables to the newest migration, in one transaction, one process at a time. A
database made before the migrations (the store's tables there, no ``alembic_version``) is recognised by its
tables and columns and stamped with the first revision, which makes exactly those tables; a database that
holds only some of them, or other columns, is refused with what to do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url

from paitient.config import ConfigError, check_owner
from paitient.fsutil import locked

FIRST_REVISION = "0001"
"""Every store's first migration: the tables as the store made them before there were migrations."""


class DatabaseError(ConfigError):
    """A store's database cannot be used as it is; the message says what to do."""


@dataclass(frozen=True)
class Location:
    """Where one store keeps its tables: ``sqlite_path``, or ``url``'s PostgreSQL database (in ``schema``;
    None: the role's default schema)."""

    sqlite_path: Path
    url: str = ""
    schema: str | None = None
    passfile: str = ""

    @classmethod
    def for_site(cls, site: Any, store: str, sqlite_path: Path) -> Location:
        """The store's place in ``site``: ``[database] url`` with the store's schema, the ledger's deprecated
        ``[workspace] ledger_url`` (its default schema, as before), or the SQLite file."""
        db = site.database
        if db.url:
            return cls(sqlite_path, db.url, db.schema(store), db.passfile)
        if store == "ledger" and site.workspace.ledger_url:
            return cls(sqlite_path, site.workspace.ledger_url)
        return cls(sqlite_path)

    @property
    def postgres(self) -> bool:
        return bool(self.url)

    def describe(self) -> str:
        if not self.postgres:
            return str(self.sqlite_path)
        u = make_url(self.url)
        where = f"{u.host or u.query.get('host', '')}{f':{u.port}' if u.port else ''}/{u.database}"
        return f"PostgreSQL {u.username}@{where}" + (f" schema {self.schema}" if self.schema else "")


def sqlalchemy_url(url: str, *, schema: str | None = None, passfile: str = "") -> sa.URL:
    """The site's ``postgresql://`` URL for SQLAlchemy's psycopg driver, with the store's schema as the
    connection's search path and the password file for libpq (so every process that connects with this URL,
    the hub's ``upgrade-db`` too, finds the same tables and password)."""
    u = make_url(url).set(drivername="postgresql+psycopg")
    query: dict[str, str | tuple[str, ...]] = dict(u.query)
    if schema:
        query["options"] = f"-csearch_path={schema}"
    if passfile:
        query["passfile"] = passfile
    return u.set(query=query)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Database:
    """One store's engine, transactions and migrations."""

    def __init__(
        self,
        where: Location,
        *,
        what: str,
        migrations: Path,
        tables: Mapping[str, tuple[str, ...]],
        synchronous: str = "FULL",
        moved_from_public: bool = False,
        pre_ping: bool = True,
    ):
        """``tables``: the store's tables and their columns as the first revision makes them (to recognise
        a database from before the migrations); the write lock takes them all on PostgreSQL.
        ``moved_from_public``: on PostgreSQL, refuse a new schema while the role's ``public`` schema holds
        these tables (a store that lived there before and must be moved, not begun anew).
        ``pre_ping``: on PostgreSQL, try each pooled connection with a round trip before handing it out (so a
        server restart goes unnoticed); False for a store on a hot path that retries a call whose connection
        was dropped itself."""
        self.where = where
        self.what = what
        self.tables = dict(tables)
        self.postgres = where.postgres
        self.engine = (
            _postgres_engine(where, what, pre_ping, synchronous)
            if self.postgres
            else _sqlite_engine(where.sqlite_path, synchronous)
        )
        self._lock = f"LOCK TABLE {', '.join(map(_quote, self.tables))} IN SHARE ROW EXCLUSIVE MODE"
        try:
            if self.postgres:
                self._migrate(migrations, moved_from_public)
            else:
                # One process or thread at a time makes or upgrades the file (PostgreSQL: an advisory lock).
                # SQLite's busy timeout does not cover the first connections' switch to WAL on a new file,
                # and stores opened at once answered "database is locked".
                path = where.sqlite_path
                with locked(path.with_name(path.name + ".migrate.lock")):
                    self._migrate(migrations, moved_from_public)
        except sa.exc.OperationalError as e:
            self.engine.dispose()
            raise self._unreachable(e) from None
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def _unreachable(self, e: sa.exc.DBAPIError) -> DatabaseError:
        first = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
        if not self.postgres:
            return DatabaseError(f"the {self.what} database {self.where.describe()} cannot be opened: {first}")
        return DatabaseError(
            f"the {self.what} database ({self.where.describe()}) cannot be reached: {first}. Check [database] url, "
            "that the server runs and lets this host and role in (pg_hba.conf), and the password in ~root/.pgpass "
            "or the file [database] passfile names."
        )

    # -- transactions ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[sa.Connection]:
        """A connection in one transaction: committed whole when the block ends, rolled back on any exception."""
        with self.engine.connect() as conn:
            if not self.postgres:
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
            elif write:
                conn.exec_driver_sql("BEGIN")
                conn.exec_driver_sql(self._lock)
            else:
                conn.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            try:
                yield conn
            except BaseException:
                try:
                    conn.exec_driver_sql("ROLLBACK")
                except sa.exc.DBAPIError:
                    conn.invalidate()  # a broken connection: the server has dropped the transaction
                raise
            conn.exec_driver_sql("COMMIT")

    # -- migrations --------------------------------------------------------------------------------------------

    def _migrate(self, migrations: Path, moved_from_public: bool) -> None:
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext

        cfg = Config()
        cfg.set_main_option("script_location", str(migrations))
        with self.engine.connect() as conn:
            if self.postgres:
                conn.exec_driver_sql("BEGIN")
                # one migrating process per store at a time (two services may start at once)
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                    {"key": f"paitient-migrate:{self.where.schema or self.what}"},
                )
                if self.where.schema:
                    conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {_quote(self.where.schema)}")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                cfg.attributes["connection"] = conn
                if MigrationContext.configure(conn).get_current_revision() is None:
                    if self._made_before_migrations(conn, moved_from_public):
                        command.stamp(cfg, FIRST_REVISION)
                command.upgrade(cfg, "head")
            except BaseException:
                conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")

    def _made_before_migrations(self, conn: sa.Connection, moved_from_public: bool) -> bool:
        """Whether the store's tables are all there, as the first revision makes them (stamp, do not make
        them); False when none is (make them); refused when some are, or with other columns."""
        inspector = sa.inspect(conn)
        present = set(inspector.get_table_names()) & set(self.tables)
        if not present:
            if self.postgres and self.where.schema and moved_from_public:
                stray = set(inspector.get_table_names(schema="public")) & set(self.tables)
                if stray:
                    moves = " ".join(
                        f"ALTER TABLE public.{t} SET SCHEMA {_quote(self.where.schema)};" for t in sorted(stray)
                    )
                    raise DatabaseError(
                        f"the {self.what}'s tables are in the schema public (from [workspace] ledger_url) and the "
                        f"schema {self.where.schema} is empty; move them before starting (as the owner, in psql: "
                        f"CREATE SCHEMA IF NOT EXISTS {_quote(self.where.schema)}; {moves}), or the budgets spent "
                        "so far would be forgotten"
                    )
            return False
        missing = sorted(set(self.tables) - present)
        if missing:
            raise DatabaseError(
                f"the {self.what} database {self.where.describe()} holds {', '.join(sorted(present))} but not "
                f"{', '.join(missing)} and no alembic_version: not a database this store made. Restore it from a "
                "backup, or point the store at an empty database."
            )
        for table, columns in self.tables.items():
            have = {c["name"] for c in inspector.get_columns(table)}
            if have != set(columns):
                raise DatabaseError(
                    f"the {self.what} database {self.where.describe()}: table {table} has columns "
                    f"{', '.join(sorted(have))}, not the {', '.join(sorted(columns))} this store made before its "
                    "migrations; restore it from a backup"
                )
        return True


def prepare_schema(where: Location, what: str) -> str:
    """Make ``where``'s schema if it is missing and return the URL that reaches it, for a program that makes
    its own tables there (the hub: JupyterHub creates and upgrades its tables itself)."""
    engine = _postgres_engine(where, what)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"paitient-migrate:{what}"})
            if where.schema:
                conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {_quote(where.schema)}")
            conn.exec_driver_sql("COMMIT")
    except sa.exc.OperationalError as e:
        first = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
        raise DatabaseError(
            f"the {what} database ({where.describe()}) cannot be reached: {first}. Check [database] url, that the "
            "server runs and lets this host and role in (pg_hba.conf), and the password in ~root/.pgpass or the "
            "file [database] passfile names."
        ) from None
    finally:
        engine.dispose()
    return sqlalchemy_url(where.url, schema=where.schema, passfile=where.passfile).render_as_string(hide_password=False)


def run_migrations() -> None:
    """The body of every store's alembic ``env.py``: run on the connection :class:`Database` passes in, inside
    its transaction."""
    from alembic import context

    conn = context.config.attributes["connection"]
    context.configure(connection=conn, transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()


# -- engines -------------------------------------------------------------------------------------------------


def _sqlite_engine(path: Path, synchronous: str) -> sa.Engine:
    """An engine on ``path`` (made root 0600 first); every connection in WAL mode, autocommit at the driver
    (the transactions are the explicit ones of :meth:`Database.transaction`)."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)
    engine = sa.create_engine(
        f"sqlite:///{path}",
        isolation_level="AUTOCOMMIT",
        connect_args={"timeout": 60, "check_same_thread": False},
        pool_size=5,
        max_overflow=15,
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        for pragma in ("journal_mode=WAL", f"synchronous={synchronous}", "busy_timeout=60000", "foreign_keys=ON"):
            dbapi_conn.execute(f"PRAGMA {pragma}")

    return engine


def _postgres_engine(where: Location, what: str, pre_ping: bool = True, synchronous: str = "FULL") -> sa.Engine:
    if where.passfile:
        path = Path(where.passfile)
        if not path.is_file():
            raise DatabaseError(
                f"[database] passfile {path} does not exist; write HOST:PORT:DATABASE:USER:PASSWORD there "
                f"(root 0600), or leave passfile empty for ~root/.pgpass"
            )
        check_owner(path, secret=True)
    try:
        import psycopg  # noqa: F401 -- the driver SQLAlchemy loads
    except ImportError:
        raise DatabaseError(
            f"the {what} is configured for PostgreSQL but the psycopg package is not installed in this "
            "environment; run scripts/setup install again, or leave [database] url empty for SQLite"
        ) from None
    engine = sa.create_engine(
        sqlalchemy_url(where.url, schema=where.schema, passfile=where.passfile),
        isolation_level="AUTOCOMMIT",
        pool_pre_ping=pre_ping,
        pool_size=5,
        max_overflow=15,
        connect_args={"connect_timeout": 10},
    )
    if synchronous != "FULL":
        # A store that asked SQLite for less than FULL asks PostgreSQL alike: a commit returns before its WAL
        # reaches the disk, so a crash of the server (not of the store) can lose the last moment's commits,
        # never half of one, as SQLite's NORMAL can on a power loss.

        @event.listens_for(engine, "connect")
        def _commit_without_waiting(dbapi_conn: Any, _record: Any) -> None:
            with dbapi_conn.cursor() as cursor:
                cursor.execute("SET synchronous_commit = off")  # for the session, whoever commits it
            if not dbapi_conn.autocommit:
                dbapi_conn.commit()

    return engine
