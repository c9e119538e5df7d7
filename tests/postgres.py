"""A real PostgreSQL server for the tests: Debian's binaries, run as the ``postgres`` system account on a
private data folder, listening on a unix socket in a root/postgres-only folder and on no TCP port.

Sign-in is by password (scram-sha-256), read by libpq from a root 0600 password file, as a site's
``[database] passfile`` works. :class:`Server` starts and stops one; :meth:`Server.database` makes a new,
empty database for one test. The fixtures that use it are in ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/usr/lib/postgresql")
ROLE = "paitient"


class Unavailable(RuntimeError):
    """The server cannot run here; the message says why and what to install."""


def binaries() -> Path:
    """The newest Debian PostgreSQL's bin folder (``/usr/lib/postgresql/<N>/bin``, 15 on Debian 12)."""
    found = [p for p in ROOT.glob("*/bin") if (p / "postgres").is_file() and (p / "initdb").is_file()]
    if not found:
        raise Unavailable(
            f"no PostgreSQL server binaries under {ROOT} (initdb, postgres); the store tests run against a real "
            "server: install the Debian package postgresql (bash scripts/setup test does)"
        )
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


@dataclass(frozen=True)
class Database:
    """One test's database: what a site's ``[database]`` table says to reach it."""

    url: str
    passfile: str

    def site_table(self) -> dict[str, str]:
        return {"url": self.url, "passfile": self.passfile}


def database_toml(table: dict[str, str]) -> str:
    """A site's ``[database]`` table as site file text ("" for none: SQLite)."""
    if not table:
        return ""
    return "[database]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())


class Server:
    def __init__(self) -> None:
        self.bin = binaries()
        try:
            self.account = pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable(
                "there is no 'postgres' system account (the Debian package postgresql makes it); install the "
                "package: bash scripts/setup test"
            ) from None
        self.root = Path(tempfile.mkdtemp(prefix="paitient-pg-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.passfile = self.root / "pgpass"
        self.password = secrets.token_hex(16)
        self.process: subprocess.Popen[bytes] | None = None

    def _as_postgres(self) -> list[str]:
        uid, gid = self.account.pw_uid, self.account.pw_gid
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--reset-env"]

    def start(self) -> None:
        uid, gid = self.account.pw_uid, self.account.pw_gid
        for d in (self.data, self.socket_dir):
            d.mkdir(mode=0o700)
            os.chown(d, uid, gid)
        pwfile = self.root / "initdb-password"
        pwfile.write_text(self.password + "\n")
        os.chown(pwfile, uid, gid)
        os.chmod(pwfile, 0o600)
        init = subprocess.run(
            [
                *self._as_postgres(),
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                ROLE,
                f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256",
                "--auth-host=reject",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            cwd=self.root,
        )
        pwfile.unlink()
        if init.returncode != 0:
            raise Unavailable(f"initdb failed (exit {init.returncode}): {(init.stderr or init.stdout)[-2000:]}")
        self.passfile.write_text(f"*:*:*:{ROLE}:{self.password}\n")
        os.chmod(self.passfile, 0o600)
        log = open(self.root / "postgres.log", "wb")  # noqa: SIM115 -- the server writes it until stop()
        self.process = subprocess.Popen(
            [
                *self._as_postgres(),
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-k",
                str(self.socket_dir),
                "-c",
                "listen_addresses=",
                "-c",
                "max_connections=300",
                "-c",
                "fsync=on",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        log.close()
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise Unavailable(f"postgres did not start: {self.log()[-2000:]}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        if not (self.socket_dir / ".s.PGSQL.5432").exists():
            return False
        probe = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", str(self.socket_dir), "-U", ROLE, "-d", "postgres", "-t", "1"],
            capture_output=True,
        )
        return probe.returncode == 0

    def log(self) -> str:
        path = self.root / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def url(self, database: str) -> str:
        return f"postgresql://{ROLE}@/{database}?host={self.socket_dir}"

    def database(self) -> Database:
        """A new, empty database."""
        import psycopg

        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url("postgres"), passfile=str(self.passfile), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return Database(self.url(name), str(self.passfile))

    def stop(self) -> None:
        """Stop the server by its pid (fast shutdown: open connections are ended), then remove its folder."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)
