"""The backlog of records waiting for the trail: its file of held records (the hub's), which a crash mid-append
costs no record held before it, and its limit."""

from __future__ import annotations

import json
import logging
import stat

from paitient.config import load
from paitient.rules.records import Event
from paitient.services.audit import trail_writer
from paitient.services.kit.backlog import MALFORMED, OVERFLOW, Backlog, HeldFile
from tests.trail import trail_down, trail_records


def test_a_line_a_crash_cut_short_is_skipped_and_the_records_before_and_after_it_are_kept(tmp_path):
    held = HeldFile(tmp_path / "hub" / "held-records.jsonl")
    assert held.held() == []
    assert held.hold([{"n": 1}, {"n": 2}]) == [1, 2]
    with open(held.path, "ab") as f:  # an append the process was killed in the middle of
        f.write(json.dumps({"seq": 3, "held": 0, "record": {"n": 3}}).encode()[:17])
    assert held.held() == [(1, {"n": 1}), (2, {"n": 2})]
    assert held.hold([{"n": 4}]) == [3]  # on a line of its own, after the cut one
    assert held.held() == [(1, {"n": 1}), (2, {"n": 2}), (3, {"n": 4})]
    assert stat.S_IMODE(held.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(held.path.parent.stat().st_mode) == 0o700
    held.drop([1, 3])
    assert held.held() == [(2, {"n": 2})]
    assert stat.S_IMODE(held.path.stat().st_mode) == 0o600
    held.drop([2])
    assert not held.path.exists() and held.held() == []


def test_past_its_limit_a_backlog_counts_what_it_cannot_keep_and_records_the_count_once_the_trail_is_back(tmp_path):
    """A trail down for long must not fill the disk with held records: past the limit they are counted by
    action, the count is held with the records (a restart keeps it) and reaches the trail after them."""
    state = tmp_path / "state"
    site = load(None, overrides={"workspace": {"state_dir": str(state)}})
    held = HeldFile(state / "hub" / "held-records.jsonl")
    backlog = Backlog(held, trail_writer(site), logging.getLogger("test-backlog"), "hub", limit=3)
    with trail_down(site):
        for i in range(5):
            event = Event(
                actor="alice", action=("auth.login", "auth.token")[i % 2], object=str(i), outcome="denied", details={}
            )
            assert backlog.write([event]) is False
        assert (backlog.waiting, backlog.overflowed) == (3, 2)
        assert [r.get("event", {}).get("object") for _, r in held.held()] == ["0", "1", "2", None]
        assert held.held()[-1][1]["overflow"]["dropped"] == 2
        # the service restarts while the trail is still down: the count is held with the records
        held = HeldFile(held.path)
        backlog = Backlog(held, trail_writer(site), logging.getLogger("test-backlog"), "hub", limit=3)
        assert (backlog.waiting, backlog.overflowed) == (3, 2)
        event = Event(actor="bob", action="auth.login", object="5", outcome="denied", details={})
        assert backlog.write([event]) is False
        assert (backlog.waiting, backlog.overflowed) == (3, 3)
        assert [r["overflow"]["dropped"] for _, r in held.held() if "overflow" in r] == [3]
    assert backlog.flush()
    written = [r for r in trail_records(site) if r["action"] in ("auth.login", "auth.token", OVERFLOW)]
    assert [r["object"] for r in written] == ["0", "1", "2", "hub"]
    overflow = written[-1]
    assert (overflow["action"], overflow["outcome"], overflow["actor"]) == (OVERFLOW, "error", "system")
    assert overflow["details"]["dropped"] == 3 and overflow["details"]["limit"] == 3
    assert overflow["details"]["actions"] == {"auth.token": 1, "auth.login": 2}
    assert (backlog.waiting, backlog.overflowed) == (0, 0) and held.held() == []


def test_a_record_the_trail_would_refuse_for_what_it_is_does_not_stop_the_records_after_it(tmp_path):
    """A writer's bug (a record the trail refuses whatever its state) must not sit at the head of the backlog
    for ever: the records after it would never be written, and the ledger would reserve nothing again."""
    state = tmp_path / "state"
    site = load(None, overrides={"workspace": {"state_dir": str(state)}})
    held = HeldFile(state / "hub" / "held-records.jsonl")
    backlog = Backlog(held, trail_writer(site), logging.getLogger("test-backlog"), "ledger")
    bad = Event(actor="alice", action="Not A Dotted Name", object="x", outcome="ok", details={"n": 1})
    good = Event(actor="alice", action="ledger.settle", object="x", outcome="ok", details={"n": 2})
    with trail_down(site):
        assert backlog.write([bad, good]) is False
    assert backlog.flush() and backlog.waiting == 0
    written = [r for r in trail_records(site) if r["action"] in (MALFORMED, "ledger.settle")]
    assert [(r["action"], r["actor"], r["outcome"]) for r in written] == [
        (MALFORMED, "system", "error"),
        ("ledger.settle", "alice", "ok"),
    ]
    assert written[0]["details"]["action"] == "Not A Dotted Name" and "dotted" in written[0]["details"]["error"]
    assert backlog.write([good]) is True


def test_a_services_held_count_of_what_it_could_not_keep_outlives_a_restart_on_both_databases(
    database_site, opened_stores
):
    """The services hold their records in their database: the count of those past the limit is held there
    too, is not itself counted as a record waiting (the metric), and is forgotten once written."""
    from paitient.services.egress.store import EgressStore
    from paitient.services.kit.backlog import HeldRecords

    site = database_site
    held = HeldRecords(opened_stores(EgressStore.for_site(site)).db)
    backlog = Backlog(held, trail_writer(site), logging.getLogger("test-backlog"), "egress", limit=2)
    events = [
        Event(actor="alice", action="egress.output", object=f"/api/{i}", outcome="ok", details={}) for i in range(4)
    ]
    with trail_down(site):
        assert backlog.write(events) is False
        assert (backlog.waiting, backlog.overflowed, held.count()) == (2, 2, 2)
        backlog = Backlog(held, trail_writer(site), logging.getLogger("test-backlog"), "egress", limit=2)
        assert (backlog.waiting, backlog.overflowed) == (2, 2)
    assert backlog.flush()
    written = [r for r in trail_records(site) if r["action"] in ("egress.output", OVERFLOW)]
    assert [r["object"] for r in written] == ["/api/0", "/api/1", "egress"]
    assert written[-1]["details"]["dropped"] == 2 and written[-1]["details"]["actions"] == {"egress.output": 2}
    assert held.held() == [] and held.count() == 0


def test_a_trail_whose_tries_are_slow_is_tried_again_only_after_nine_times_as_long(tmp_path):
    """A long backlog against a full disk: each try prepares every record waiting before the disk refuses it.
    Retrying at every new record would spend the writer's time on it; a write waits nine times as long as the
    failed try took before it tries again, holding the records that come meanwhile. A flush (an action that
    needs the trail) tries at once."""
    import errno
    import time

    from paitient.services.kit.backlog import RETRY_WAIT

    tries: list[int] = []
    trail: list[Event] = []
    full = True

    def write(events: list[Event]) -> None:
        tries.append(len(events))
        if full:
            time.sleep(0.1)  # preparing the records
            raise OSError(errno.ENOSPC, "No space left on device")
        trail.extend(events)

    held = HeldFile(tmp_path / "held-records.jsonl")
    backlog = Backlog(held, write, logging.getLogger("test-backlog"), "egress")
    events = [Event(actor="alice", action="egress.output", object=str(i), outcome="ok", details={}) for i in range(5)]
    assert backlog.write(events[:1]) is False
    assert backlog.write(events[1:2]) is False
    assert tries == [1] and "No space left" in backlog.last_error
    assert [r["event"]["object"] for _, r in held.held()] == ["0", "1"]  # held meanwhile, all the same
    began = time.monotonic()
    assert backlog.flush() is False and tries == [1, 2]
    failed = time.monotonic()
    full = False
    assert backlog.write(events[2:3]) is False and tries == [1, 2]  # the flush's try was refused just now
    time.sleep(max(0.0, failed + RETRY_WAIT * (failed - began) + 0.05 - time.monotonic()))
    assert backlog.write(events[3:4]) is True
    assert tries == [1, 2, 4] and [e["object"] for e in trail] == ["0", "1", "2", "3"]
    assert held.held() == []
    assert backlog.write(events[4:]) is True and tries == [1, 2, 4, 1]


def test_after_a_refused_write_a_flush_that_succeeds_lets_the_next_write_try_at_once(tmp_path):
    """The ledger flushes before a reservation and then writes its record: once the flush found the trail
    back, the record must be written, not held for the wait the refused try set."""
    import time

    refused = True

    def write(events: list[Event]) -> None:
        if refused:
            time.sleep(0.2)
            raise OSError("the trail is down")

    backlog = Backlog(HeldFile(tmp_path / "held.jsonl"), write, logging.getLogger("test-backlog"), "ledger")
    event = Event(actor="alice", action="ledger.reserve", object="onc/d", outcome="ok", details={})
    assert backlog.write([event]) is False
    refused = False
    assert backlog.flush() is True
    assert backlog.write([event]) is True and backlog.waiting == 0


def test_a_count_whose_older_entry_cannot_be_forgotten_stays_right_and_both_go_with_the_write(tmp_path):
    """Replacing the held count is two steps (hold the new, forget the old); when the second fails, both stay
    held, the later counts at a restart, and both are forgotten once the trail has the count."""

    class ForgetsOnceBadly(HeldFile):
        refuse = True

        def drop(self, seqs: list[int]) -> None:
            if self.refuse and seqs:
                self.refuse = False
                raise OSError("the disk refused the rewrite")
            super().drop(seqs)

    down = True

    def write(events: list[Event]) -> None:
        if down:
            raise OSError("the trail is down")

    held = ForgetsOnceBadly(tmp_path / "held.jsonl")
    backlog = Backlog(held, write, logging.getLogger("test-backlog"), "airlock", limit=1)
    event = Event(actor="alice", action="airlock.check", object="r1", outcome="ok", details={})
    backlog.write([event, event])  # one kept, one counted: the count is held
    backlog.flush()  # (nothing new to hold)
    backlog.write([event])  # the count is now 2: the new one held, forgetting the old one fails
    assert [r["overflow"]["dropped"] for _, r in held.held() if "overflow" in r] == [1, 2]
    again = Backlog(HeldFile(held.path), write, logging.getLogger("test-backlog"), "airlock", limit=1)
    assert (again.waiting, again.overflowed) == (1, 2)
    down = False
    assert backlog.flush() and held.held() == []
