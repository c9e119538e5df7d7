"""The ledger on a real PostgreSQL server (started here as 'nobody', on a unix socket only)."""

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from paitient.rules.budget import BudgetExceeded
from paitient.services.ledger.store import Ledger, LedgerError

PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))  # Debian's postgresql
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def pg_url(world_tmp):
    data, sock = world_tmp / "pgdata", world_tmp / "pgsock"
    data.mkdir()
    sock.mkdir()
    shutil.chown(data, 65534, 65534)
    shutil.chown(sock, 65534, 65534)
    subprocess.run(
        [*NOBODY, str(PG_BIN / "initdb"), "-D", str(data), "-U", "ledger", "--auth=trust", "--no-instructions"],
        check=True,
        capture_output=True,
        cwd=world_tmp,
    )
    server = subprocess.Popen(
        [
            *NOBODY,
            str(PG_BIN / "postgres"),
            "-D",
            str(data),
            "-k",
            str(sock),
            "-c",
            "listen_addresses=",
            "-c",
            "max_connections=50",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=world_tmp,
    )
    deadline = time.monotonic() + 30
    while not (sock / ".s.PGSQL.5432").exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"postgres did not start: {server.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    yield f"postgresql://ledger@/postgres?host={sock}"
    server.terminate()
    server.wait(timeout=30)


def test_ledger_on_postgres(site, pg_url):
    ledger = Ledger(site, url=pg_url)
    assert type(ledger.db).__name__ == "_Postgres"
    row = ledger.reserve("oncology", "gbsg2", 1.5, 1e-7, user="alice", pid=os.getpid())
    with pytest.raises(BudgetExceeded, match="epsilon 1 asked, but oncology/gbsg2 has 0.5 left of 2"):
        ledger.reserve("oncology", "gbsg2", 1.0, 1e-7, user="alice")
    ledger.settle(row, 1.25, record={"weights_sha256": "aa" * 32, "steps": 3}, user="alice")
    assert ledger.record_by_hash("aa" * 32)["record"]["steps"] == 3
    with pytest.raises(LedgerError, match="already settled"):
        ledger.settle(row, 1.0, user="alice")
    ledger.set_budget("oncology", "gbsg2", 3.0, 1e-6, by="sam")
    b = {x["dataset"]: x for x in Ledger(site, url=pg_url).budget("oncology")}["gbsg2"]
    assert (b["epsilon_total"], b["epsilon_spent"], b["epsilon_left"], b["source"]) == (3.0, 1.25, 1.75, "steward")
    lost = ledger.reserve("oncology", "gbsg2", 0.5, 1e-7, user="alice", pid=999999, pid_start=1)
    assert ledger.mark_lost(lambda pid, start: pid != 999999) == [lost]
    # the same data through a new instance: nothing only in memory
    assert [r["state"] for r in Ledger(site, url=pg_url).runs("oncology", "gbsg2")] == ["settled", "lost"]


def test_concurrent_reservations_on_postgres(site, pg_url):
    ledger = Ledger(site, url=pg_url)
    got, refused = [], []

    def worker():
        for _ in range(6):
            try:
                got.append(ledger.reserve("oncology", "gbsg2", 0.07, 1e-9, user="alice"))
            except BudgetExceeded:
                refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 28 and len(refused) == 48 - 28
    assert ledger.budget("oncology")[1]["epsilon_reserved"] == pytest.approx(28 * 0.07)
