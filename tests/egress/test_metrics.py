"""The egress service's metrics move with its verdicts: bytes forwarded, outputs withheld, the records' wait."""

from __future__ import annotations

import os
import socket
import time

import pytest

from paitient.config import parse
from paitient.registry import Registry
from paitient.services.egress import socket_path
from paitient.services.egress.service import Context, EgressServer, EgressService
from paitient.services.egress.store import EgressStore
from tests.egress.conftest import stored
from tests.egress.test_service import CallerIsAlice, MarkedRows, rows
from tests.scrape import text, value


@pytest.fixture
def site(world_tmp, database):
    """The service's site, its counts in ``database`` (parametrised: SQLite, then PostgreSQL)."""
    state = world_tmp / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    return parse(
        {
            "workspace": {"state_dir": str(state)},
            "projects": [{"name": "onc", "group": "cn=onc", "datasets": ["bc"]}],
            "database": database,
        }
    )


def started(site):
    store = EgressStore.for_site(site)
    return EgressService(site, store, MarkedRows(site), CallerIsAlice.for_state_dir(site.state_dir)), store


def test_a_forwarded_output_counts_its_bytes_and_a_withheld_one_its_reason(site):
    service, store = started(site)
    alice = CallerIsAlice.alice
    registry = service.metrics.registry
    try:
        small = rows(0, 3)
        assert service.check(alice, Context("k:1", "kernel", "k"), small, small)["verdict"] == "forward"
        assert value(registry, "paitient_egress_bytes_total", channel="kernel") == len(small)
        assert value(registry, "paitient_egress_pieces_total", channel="kernel", verdict="forward") == 1
        assert value(registry, "paitient_egress_withheld_outputs_total", channel="kernel", reason="rows") == 0

        dump = rows(100, site.egress.max_rows_per_output + 1)
        answer = service.check(alice, Context("c:1", "contents", "notes.txt"), dump, dump)
        assert answer["verdict"] == "withhold" and answer["reason"] == "rows"
        assert value(registry, "paitient_egress_withheld_outputs_total", channel="contents", reason="rows") == 1
        assert value(registry, "paitient_egress_pieces_total", channel="contents", verdict="withhold") == 1
        assert value(registry, "paitient_egress_bytes_total", channel="contents") == 0  # nothing of it left
        assert value(registry, "paitient_egress_check_seconds_count") == 2

        # today's totals come from the store (the counts reach it a moment after the answers): over every user
        stored(service)
        assert value(registry, "paitient_egress_today_bytes") == len(small)
        assert value(registry, "paitient_egress_today_outputs") == 1
        assert value(registry, "paitient_egress_today_withheld_outputs") == 1
        assert value(registry, "paitient_egress_today_users") == 1
        assert "alice" not in text(registry)  # aggregates: no user anywhere
    finally:
        service.close()
        store.close()


def test_todays_totals_survive_a_restart_and_the_counters_start_again(site):
    service, store = started(site)
    out = rows(0, 2)
    service.check(CallerIsAlice.alice, Context("k:1", "kernel", "k"), out, out)
    service.close()
    store.close()
    again, store = started(site)
    try:
        assert value(again.metrics.registry, "paitient_egress_today_bytes") == len(out)
        assert value(again.metrics.registry, "paitient_egress_bytes_total", channel="kernel") == 0
    finally:
        again.close()
        store.close()


def test_records_waiting_for_the_trail_and_their_wait_are_measured(site):
    service, store = started(site)
    registry = service.metrics.registry
    try:
        for i in range(3):
            ctx = Context(f"k:{i}", "kernel", "k")
            service.check(CallerIsAlice.alice, ctx, b"done", b"done")
            service.record_context(CallerIsAlice.alice, ctx)
        service.flush()
        assert value(registry, "paitient_egress_audit_lag_seconds_count") == 3
        assert value(registry, "paitient_egress_audit_pending_records") == 0
        assert value(registry, "paitient_egress_trail_up") == 1
        assert value(registry, "paitient_egress_audit_failures_total") == 0
        # the trail cannot be written: the records are counted as lost and the trail as down
        audit = site.state_dir / "audit"
        for f in audit.iterdir():
            f.unlink()
        audit.rmdir()
        audit.write_text("not a folder: the trail cannot be written")
        ctx = Context("k:x", "kernel", "k")
        service.check(CallerIsAlice.alice, ctx, b"done", b"done")
        service.record_context(CallerIsAlice.alice, ctx)
        service.flush()
        assert value(registry, "paitient_egress_trail_up") == 0
        assert value(registry, "paitient_egress_audit_failures_total") == 1
        assert value(registry, "paitient_egress_audit_lag_seconds_count") == 3
    finally:
        service.close()
        store.close()


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_connected_servers_are_counted(site):
    store = EgressStore.for_site(site)
    service = EgressService(site, store, MarkedRows(site), Registry.for_state_dir(site.state_dir))
    server = EgressServer(socket_path(site), service)
    server.start_in_thread()
    registry = service.metrics.registry
    try:
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(str(socket_path(site)))
        wait_for(lambda: value(registry, "paitient_egress_connections") == 1)
        conn.close()
        wait_for(lambda: value(registry, "paitient_egress_connections") == 0)
    finally:
        server.shutdown()
        server.server_close()
        service.close()
        store.close()
