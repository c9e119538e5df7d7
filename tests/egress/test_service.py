"""The egress service on a real socket: per-output row limits, the user's day, fail-closed, the audit records.

The matcher here reads row ids from the text (``row:<n>`` marks row n of ``onc/bc``) so the service's own
logic is tested apart from the row detection (tests/egress/test_edm*.py test that against real data).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from paitient.config import parse
from paitient.registry import Member, Registry
from paitient.server.gate import EgressGate
from paitient.services.egress import service as service_module
from paitient.services.egress import socket_path
from paitient.services.egress.matcher import Matcher, MissingIndex
from paitient.services.egress.service import Context, EgressServer, EgressService
from paitient.services.egress.store import EgressStore, today
from tests import workspacegroup
from tests.egress.conftest import stored
from tests.scrape import value
from tests.trail import trail_records

ROW = re.compile(rb"row:(\d+)")
HALF = re.compile(rb"half:(\d+)")


class MarkedRows(Matcher):
    """Rows are whatever ``row:<n>`` marks the text carries, and those whose ``half:<n>`` it carries twice;
    ``broken`` makes matching fail."""

    broken = False
    crash_on: bytes | None = None
    """Text that makes matching fail unexpectedly (as a bug the text set off would)."""

    def reveal(self, text: bytes, projects):
        if self.broken:
            raise MissingIndex("onc/bc version 1 has no row index")
        if self.crash_on is not None and self.crash_on in text:
            raise RuntimeError("the matcher failed on this text")
        halves = [int(m) for m in HALF.findall(text)]
        ids = sorted({int(m) for m in ROW.findall(text)} | {h for h in halves if halves.count(h) > 1})
        return {"onc/bc": np.array(ids, dtype=np.int64)} if ids and "onc" in projects else {}


@pytest.fixture
def site(world_tmp, database):
    """The service's site, its counts in ``database`` (parametrised: SQLite under the state_dir, then PostgreSQL)."""
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


class CallerIsAlice(Registry):
    """The gate of these tests runs in the test's own process, as root, which no member may be: the
    service takes that caller for alice."""

    alice = Member("alice", "pt-alice", 30001, ("onc",), ("researcher",))

    def by_uid(self, uid: int) -> Member | None:
        return self.alice if uid == os.getuid() else None


@pytest.fixture
def running(site):
    store = EgressStore.for_site(site)
    matcher = MarkedRows(site)
    service = EgressService(site, store, matcher, CallerIsAlice.for_state_dir(site.state_dir))
    server = EgressServer(socket_path(site), service, group=workspacegroup.gid())
    server.start_in_thread()
    gate = EgressGate(
        str(socket_path(site)),
        fail_closed_bytes=site.egress.fail_closed_bytes,
        unchecked_bytes=site.egress.unchecked_bytes,
    )
    yield service, gate
    gate.shutdown()
    server.shutdown()
    server.server_close()
    service.close()
    store.close()


def rows(first: int, n: int) -> bytes:
    return b"\n".join(b"row:%d,1.5,2.5" % i for i in range(first, first + n))


def test_an_output_under_the_row_limit_passes_and_is_counted(site, running):
    service, gate = running
    check = gate.check_blocking(context="k:1", channel="kernel", object="k", text=rows(0, 5))
    assert check.forward and check.rows == {"onc/bc": 5}
    day = stored(service).day("alice", today())
    assert (day.rows, day.outputs, day.bytes) == (5, 1, len(rows(0, 5)))


def test_rows_add_up_over_the_pieces_of_one_output(site, running):
    _, gate = running
    for first in (0, 10):
        assert gate.check_blocking(context="k:1", channel="kernel", object="k", text=rows(first, 10)).forward
    third = gate.check_blocking(context="k:1", channel="kernel", object="k", text=rows(20, 10))
    assert not third.forward and third.reason == "rows"
    assert "30 rows of bc" in third.notice and "airlock" in third.notice
    # another output starts from zero
    assert gate.check_blocking(context="k:2", channel="kernel", object="k", text=rows(40, 10)).forward


def test_an_output_closed_at_its_reply_or_idle_counts_on_from_the_rows_it_showed(site, running, monkeypatch):
    """A kernel's later message charged to an execution whose output was closed (at its reply, or idle for a
    minute) counts on from the rows that output showed; before, it started from zero, 15 rows at a time."""
    _, gate = running

    def check(context: str, text: bytes):
        return gate.check_blocking(context=context, channel="kernel", object="k", text=text)

    assert check("k:1", rows(0, 15)).forward
    gate.close_blocking("k:1")  # its reply
    assert check("k:1", b"epoch 3 loss 0.21").forward  # a later message without rows passes
    later = check("k:1", rows(100, 10))
    assert not later.forward and later.reason == "rows" and "25 rows of bc" in later.notice
    # a withheld output stays over its limit once closed: one more row of it is withheld
    assert not check("k:2", rows(200, 30)).forward
    gate.close_blocking("k:2")
    assert not check("k:2", rows(300, 1)).forward
    # idle: every context is closed after each piece
    monkeypatch.setattr(service_module, "IDLE_SECONDS", 0.0)
    assert check("k:3", rows(400, 15)).forward
    time.sleep(0.01)
    idle = check("k:3", rows(500, 10))
    assert not idle.forward and "25 rows of bc" in idle.notice
    # other outputs still start from zero
    assert check("k:4", rows(600, 15)).forward


def test_an_output_counts_on_from_its_rows_when_the_gate_connects_anew(site, running):
    """The gate connects anew when its connection breaks; the rows each output showed were the old
    connection's, and an execution's output on the new one started from zero (20 more rows each time).
    Now an output counts on from what it showed, on a connection still open or closed, and others do not."""
    service, gate = running

    def check(context: str, text: bytes):
        return gate.check_blocking(context=context, channel="kernel", object="k", text=text)

    assert check("k:1", rows(0, 15)).forward
    assert check("k:2", rows(1000, 5)).forward
    other = make_gate(site)  # a second connection while the first is open (a server whose link broke)
    try:
        later = other.check_blocking(context="k:1", channel="kernel", object="k", text=rows(100, 10))
        assert not later.forward and later.reason == "rows" and "25 rows of bc" in later.notice
        gate._sync_link.close()  # the first connection ends, and its outputs close with it
        deadline = time.monotonic() + 10
        while ("alice", "k:2") in service.outputs._open and time.monotonic() < deadline:
            time.sleep(0.05)
        again = other.check_blocking(context="k:2", channel="kernel", object="k", text=rows(2000, 16))
        assert not again.forward and "21 rows of bc" in again.notice
        assert other.check_blocking(context="k:3", channel="kernel", object="k", text=rows(3000, 20)).forward
    finally:
        other.shutdown()


def test_a_row_printed_over_several_pieces_of_one_output_is_found(site, running):
    """The browser shows an output's stream messages as one text: each piece is read after the end of the
    output's text before it, so a row whose values come a message at a time is found."""
    _, gate = running

    def check(context: str, text: bytes):
        return gate.check_blocking(context=context, channel="kernel", object="k", text=text)

    assert check("k:1", b"half:7,").rows == {}
    assert check("k:1", b"half:7\n").rows == {"onc/bc": 1}
    # other outputs, and what lies farther back than the tail, do not join
    assert check("k:2", b"half:8").rows == {} and check("k:3", b"half:8").rows == {}
    check("k:4", b"half:9")
    check("k:4", b"x" * 8192)
    assert check("k:4", b"half:9").rows == {}


def test_the_same_rows_again_do_not_count_twice_in_a_day(site, running):
    service, gate = running
    for i in range(30):
        assert gate.check_blocking(context=f"k:{i}", channel="kernel", object="k", text=rows(0, 15)).forward
    assert stored(service).day("alice", today()).rows == 15


def test_a_drip_of_small_outputs_stops_at_the_daily_rows(site, running):
    service, gate = running
    passed = 0
    for i in range(30):
        check = gate.check_blocking(context=f"k:{i}", channel="kernel", object="k", text=rows(i * 10, 10))
        if not check.forward:
            assert check.reason == "daily_rows" and "200 dataset rows today" in check.notice
            break
        passed += 1
    assert passed == 20  # 20 outputs of 10 new rows: 200
    day = stored(service).day("alice", today())
    assert day.rows == 200 and day.withheld == 1
    # outputs without rows still pass
    assert gate.check_blocking(context="k:x", channel="kernel", object="k", text=b"accuracy 0.93").forward


def test_the_daily_bytes_bound_every_channel(site, running):
    service, gate = running
    limit = site.egress.daily_bytes
    blob = os.urandom(1_000_000)
    passed = 0
    for i in range(25):
        channel = ("kernel", "contents", "http")[i % 3]
        check = gate.check_blocking(context=f"c:{i}", channel=channel, object="x", text=b"", binary=blob)
        if not check.forward:
            assert check.reason == "daily_bytes" and "20 MB" in check.notice
            break
        passed += 1
    assert passed == limit // len(blob)
    assert stored(service).day("alice", today()).bytes == passed * len(blob)


def test_counts_survive_a_restart_of_the_service(site, running):
    service, gate = running
    assert gate.check_blocking(context="k:1", channel="kernel", object="k", text=rows(0, 7)).forward
    service.close()  # a stop stores what it counted
    again = EgressStore.for_site(site)
    try:
        assert again.day("alice", today()).rows == 7
    finally:
        again.close()


def test_unmatched_outputs_fail_closed_above_the_small_size(site, running):
    service, gate = running
    service.matcher.broken = True
    assert gate.check_blocking(context="k:1", channel="kernel", object="k", text=b"x" * 100).forward
    big = gate.check_blocking(context="k:2", channel="kernel", object="k", text=b"x" * 5000)
    assert not big.forward and big.reason == "unchecked" and "cannot check outputs" in big.notice


def test_when_the_trail_cannot_record_large_outputs_are_withheld(site, running):
    service, gate = running
    audit = site.state_dir / "audit"
    audit.parent.mkdir(exist_ok=True)
    audit.write_text("not a folder: the trail cannot be written")
    try:
        gate.check_blocking(context="k:1", channel="http", object="/api/x", text=b"small", final=True)
        service.flush()  # the record is written by the service's writer thread
        assert service.audit_ok is False
        big = gate.check_blocking(context="k:2", channel="kernel", object="k", text=b"x" * 5000)
        assert not big.forward and big.reason == "unchecked"
    finally:
        audit.unlink()
    gate.check_blocking(context="k:3", channel="http", object="/api/x", text=b"small", final=True)
    service.flush()
    assert service.audit_ok is True
    assert gate.check_blocking(context="k:4", channel="kernel", object="k", text=b"x" * 5000).forward


def test_when_the_service_is_down_the_gate_fails_closed(site):
    gate = EgressGate(
        str(socket_path(site)),
        fail_closed_bytes=site.egress.fail_closed_bytes,
        unchecked_bytes=site.egress.unchecked_bytes,
    )
    small = gate.check_blocking(context="k", channel="kernel", object="k", text=b"x" * 100)
    big = gate.check_blocking(context="k", channel="kernel", object="k", text=b"x" * 5000)
    assert small.forward and not big.forward and big.reason == "unchecked"


def drip(gates: list[EgressGate], pieces: int, size: int = 1000) -> tuple[int, list]:
    """Small pieces of rows, each its own output, spread over ``gates`` in turn: the bytes forwarded, and the
    checks of the withheld pieces."""
    forwarded, refused = 0, []
    for i in range(pieces):
        piece = rows(i * 10, 10).ljust(size, b" ")
        check = gates[i % len(gates)].check_blocking(context=f"k:{i}", channel="kernel", object="k", text=piece)
        if check.forward:
            forwarded += len(piece)
        else:
            refused.append(check)
    return forwarded, refused


def make_gate(site) -> EgressGate:
    return EgressGate(
        str(socket_path(site)),
        fail_closed_bytes=site.egress.fail_closed_bytes,
        unchecked_bytes=site.egress.unchecked_bytes,
    )


def test_while_rows_cannot_be_matched_small_outputs_pass_only_up_to_the_allowance(site, running):
    """Attack: while the matcher is broken, a drip of small outputs (each under fail_closed_bytes), from two
    connections (a second server of the same user, or a reconnect): what passes unchecked is bounded by
    unchecked_bytes for the user, and the first checked output renews it."""
    service, gate = running
    allowance = site.egress.unchecked_bytes
    service.matcher.broken = True
    other = make_gate(site)
    try:
        forwarded, refused = drip([gate, other], 2 * allowance // 1000)
        assert allowance - 1000 < forwarded <= allowance
        assert len(refused) >= allowance // 1000 - 1
        assert all(c.reason == "unchecked" and "may pass unchecked" in c.notice for c in refused)
        service.matcher.broken = False
        assert gate.check_blocking(context="k:ok", channel="kernel", object="k", text=rows(0, 3)).forward
        service.matcher.broken = True
        assert other.check_blocking(context="k:again", channel="kernel", object="k", text=b"x" * 100).forward
    finally:
        other.shutdown()


def test_a_piece_whose_question_cannot_be_put_is_withheld_not_passed_unchecked(site, running):
    """Attack: an output named by a context too long for the wire's header (the browser chose its msg_id). The
    gate took the error for the service being away and passed each small piece on the unchecked allowance,
    which the next answered check renewed. Now such a piece is withheld, the allowance untouched."""
    _, gate = running
    long_context = "kernel:k:" + "m" * 70_000
    for _ in range(3):
        check = gate.check_blocking(context=long_context, channel="kernel", object="k", text=rows(0, 3))
        assert not check.forward and check.reason == "unaskable" and "could not be checked" in check.notice
    assert gate.unchecked_spent == 0
    assert gate.check_blocking(context="k:fine", channel="kernel", object="k", text=rows(0, 3)).forward


def test_while_the_service_is_down_small_outputs_pass_only_up_to_the_allowance(site):
    """Attack: the egress service is down and a server's outputs come in small pieces, many outputs (cells)
    long: the gate lets through unchecked_bytes in all, then withholds everything until the service answers
    again, which renews the allowance."""
    allowance = site.egress.unchecked_bytes
    gate = make_gate(site)
    try:
        forwarded, refused = drip([gate], 2 * allowance // 1000)
        assert allowance - 1000 < forwarded <= allowance and gate.unchecked_spent == forwarded
        assert refused and all(c.reason == "unchecked" and "may pass unchecked" in c.notice for c in refused)
        assert not gate.check_blocking(context="k:tiny", channel="kernel", object="k", text=b"x" * 1000).forward
        store = EgressStore.for_site(site)
        service = EgressService(site, store, MarkedRows(site), CallerIsAlice.for_state_dir(site.state_dir))
        server = EgressServer(socket_path(site), service, group=workspacegroup.gid())
        server.start_in_thread()
        try:
            assert gate.check_blocking(context="k:back", channel="kernel", object="k", text=rows(0, 3)).forward
            assert gate.unchecked_spent == 0
        finally:
            server.shutdown()
            server.server_close()
            service.close()
            store.close()
    finally:
        gate.shutdown()


def test_what_left_is_in_the_audit_trail(site, running):
    service, gate = running
    gate.check_blocking(context="k:1", channel="kernel", object="kernel-1", text=rows(0, 3))
    gate.check_blocking(context="k:1", channel="kernel", object="kernel-1", text=rows(3, 30))
    gate.close_blocking("k:1")
    service.flush()
    withheld = trail_records(site, action="egress.withheld")
    assert len(withheld) == 1 and withheld[0]["actor"] == "alice"
    assert withheld[0]["details"]["rows"] == {"onc/bc": 33} and withheld[0]["details"]["reason"] == "rows"
    (out,) = trail_records(site, action="egress.output")
    d = out["details"]
    assert out["outcome"] == "denied" and d["verdict"] == "partly withheld" and d["channel"] == "kernel"
    assert d["bytes"] == len(rows(0, 3)) and d["rows"] == {"onc/bc": 33} and d["pieces"] == 2
    import hashlib

    assert d["sha256"] == hashlib.sha256(rows(0, 3)).hexdigest()


def test_records_that_queue_up_are_written_together_in_order(site, running):
    service, gate = running
    batches = []
    write = service._write

    def counted(records):
        batches.append(len(records))
        write(records)

    service._write = counted
    for i in range(20):
        assert gate.check_blocking(context=f"k:{i}", channel="kernel", object=f"out-{i}", text=b"x", final=True).forward
    service.flush()
    assert sum(batches) == 20 and len(batches) < 20, batches  # fewer appends (and fsyncs) than records
    assert [r["object"] for r in trail_records(site, action="egress.output")] == [f"out-{i}" for i in range(20)]
    from paitient.services.audit.verify import verify_dir

    assert verify_dir(site.state_dir / "audit").ok


def test_an_unknown_account_is_refused(site, running, make_system_user):
    stranger = make_system_user("stranger")
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]);"
        "from paitient.server.gate import _Link; print(_Link(sys.argv[1]).request({'op': 'hello'}))"
    )
    out = subprocess.run(
        [
            "setpriv",
            f"--reuid={stranger.pw_uid}",
            f"--regid={stranger.pw_gid}",
            workspacegroup.setpriv_groups(),  # in the workspace's group, but no workspace user
            sys.executable,
            "-c",
            code,
            str(socket_path(site)),
            str(os.path.abspath("extensions")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "'code': 'forbidden'" in out.stdout and "is not a workspace user" in out.stdout, out


def test_many_servers_at_once(site, running):
    service, _ = running
    errors = []

    def one(i):
        gate = EgressGate(
            str(socket_path(site)),
            fail_closed_bytes=site.egress.fail_closed_bytes,
            unchecked_bytes=site.egress.unchecked_bytes,
        )
        try:
            for j in range(20):
                if not gate.check_blocking(context=f"s{i}:{j}", channel="kernel", object="k", text=b"x").forward:
                    errors.append((i, j))
        finally:
            gate.shutdown()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert stored(service).day("alice", today()).outputs == 160


def test_a_piece_the_matcher_fails_on_is_withheld_whatever_the_allowance(site, running):
    """Attack: were there text that made the matcher fail, rows sent with it would pass on the unchecked
    allowance, and a checked output between two such pieces would renew it, without end. A piece the matcher
    fails on (other than for a missing index) is withheld outright; ordinary outputs between still pass."""
    service, gate = running
    service.matcher.crash_on = b"crash!"
    try:
        for i in range(5):
            piece = rows(i * 10, 10) + b"crash!"
            bad = gate.check_blocking(context=f"k:c{i}", channel="kernel", object="k", text=piece)
            assert len(piece) < site.egress.fail_closed_bytes and not bad.forward and bad.reason == "unchecked"
            assert gate.check_blocking(context=f"k:n{i}", channel="kernel", object="k", text=b"loss 0.25").forward
    finally:
        service.matcher.crash_on = None


def test_outputs_at_the_same_moment_cannot_both_pass_the_last_of_the_daily_bytes(site, running):
    """Attack: many outputs at once, each of which fits the day's bytes alone. The decision and its count are
    one step per user: exactly as many pass as fit."""
    service, _ = running
    fits = 9
    piece = os.urandom(site.egress.daily_bytes // (fits + 1) + 1)  # nine fit, not ten
    start = threading.Barrier(16)
    verdicts: list[str] = []

    def one(i: int) -> None:
        start.wait()
        verdicts.append(service.check(CallerIsAlice.alice, Context(f"k:{i}", "kernel", "k"), b"", piece)["verdict"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(verdicts) == ["forward"] * fits + ["withhold"] * (16 - fits)
    day = stored(service).day("alice", today())
    assert (day.bytes, day.outputs, day.withheld) == (fits * len(piece), fits, 16 - fits)


def test_while_the_counts_cannot_be_stored_outputs_are_refused_and_none_counted_is_lost(site, running):
    """The database takes no counts (another session holds its table): they wait, and once they have waited
    too long the service refuses to check outputs, so a user's server passes only its small allowance. When the
    database takes them again, every count made meanwhile is stored and checks go on."""
    service, gate = running
    service.counts.stale_seconds = 1.0
    assert gate.check_blocking(context="k:0", channel="kernel", object="k", text=rows(0, 2)).forward
    stored(service)
    blocker = service.store.db.engine.raw_connection()
    conn = blocker.driver_connection
    if service.store.postgres:
        conn.execute("BEGIN")
        conn.execute("LOCK TABLE usage IN EXCLUSIVE MODE")  # writes wait; reads (the metrics) go on
    else:
        conn.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(3):  # counted at once, stored later
            check = gate.check_blocking(context=f"k:{i + 1}", channel="kernel", object="k", text=rows(10 + i, 1))
            assert check.forward and check.reason != "unchecked"
        deadline = time.monotonic() + 30
        while not service.counts.trouble() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "the egress counts cannot be stored" in service.counts.trouble()
        assert value(service.metrics.registry, "paitient_egress_counts_waiting") == 3  # what the operator sees
        small = gate.check_blocking(context="k:5", channel="kernel", object="k", text=b"a short answer")
        assert small.forward and small.reason == "unchecked"  # the server's own allowance, not the service
        large = gate.check_blocking(context="k:6", channel="kernel", object="k", text=b"", binary=os.urandom(10_000))
        assert not large.forward and large.reason == "unchecked"
    finally:
        conn.execute("ROLLBACK")
        blocker.close()
    assert service.counts.flush() and service.counts.trouble() == ""
    assert value(service.metrics.registry, "paitient_egress_counts_waiting") == 0
    day = service.store.day("alice", today())
    assert (day.outputs, day.rows) == (4, 5)  # the first output and the three made while the table was held
    again = gate.check_blocking(context="k:7", channel="kernel", object="k", text=rows(20, 1))
    assert again.forward and again.reason != "unchecked"


def test_records_waiting_for_the_trail_outlive_a_kill_9_of_the_service(site):
    """Attack: outputs leave while the trail is down (small ones, on the unchecked allowance), and the egress
    service is killed with -9 before the trail is back. Their records were held in the service's database:
    the next service writes them to the trail, in order, each saying when it happened."""
    from paitient.services.kit.backlog import HeldRecords
    from tests import rootmember
    from tests.server.harness import egress_service
    from tests.trail import trail_down

    rootmember.put(Registry.for_state_dir(site.state_dir), Member("alice", "pt-alice", 0, ("onc",), ("researcher",)))
    objects = [f"/api/out-{i}" for i in range(3)]

    def held() -> list[str]:
        store = EgressStore.for_site(site)
        try:
            return [r["event"]["object"] for _, r in HeldRecords(store.db).held()]
        finally:
            store.close()

    with trail_down(site), egress_service(site) as proc:
        gate = EgressGate(
            str(socket_path(site)),
            fail_closed_bytes=site.egress.fail_closed_bytes,
            unchecked_bytes=site.egress.unchecked_bytes,
        )
        try:
            for i, obj in enumerate(objects):
                assert gate.check_blocking(
                    context=f"k:{i}", channel="http", object=obj, text=b"small", final=True
                ).forward
            deadline = time.monotonic() + 30
            while held() != objects and time.monotonic() < deadline:
                time.sleep(0.1)
            assert held() == objects
        finally:
            gate.shutdown()
        os.kill(proc.pid, 9)
        proc.wait(30)
        socket_path(site).unlink()
    assert trail_records(site, action="egress.output") == []
    with egress_service(site):
        deadline = time.monotonic() + 30
        while held() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held() == []
    written = trail_records(site, action="egress.output")
    assert [r["object"] for r in written] == objects
    assert all(r["actor"] == "alice" and "happened" in r["details"] for r in written)
