"""The audit service's metrics: how long an event waits for its durable record, and the trail as it grows."""

from __future__ import annotations

import logging
import time

import pytest

from paitient.channel import ChannelError, Peer
from paitient.registry import Member, Registry
from paitient.services.audit import emit
from paitient.services.audit.metrics import AuditMetrics
from paitient.services.audit.service import handlers
from paitient.services.audit.writer import read_head
from tests.scrape import text, value

ALICE = Member(username="alice", account="pt-alice", uid=30001, projects=())


@pytest.fixture
def record(site):
    Registry.for_state_dir(site.state_dir).put(ALICE)
    metrics = AuditMetrics(site)
    ops = handlers(site, logging.getLogger("test-audit"), metrics)
    peer = Peer(pid=1, uid=ALICE.uid, gid=ALICE.uid)

    def send(**args):
        return ops["record"](peer, args, [])

    return send, metrics.registry


def test_each_record_from_a_kernel_is_timed_to_its_durable_write(site, record):
    send, registry = record
    assert value(registry, "paitient_audit_append_seconds_count") == 0
    for i in range(3):
        send(action="cell.execute", object=f"k{i}", details={"code": "x = 1"})
    send(action="kernel.stop", object="k0", outcome="error")
    assert value(registry, "paitient_audit_append_seconds_count") == 4
    assert 0 < value(registry, "paitient_audit_append_seconds_sum") < 4 * 5
    assert value(registry, "paitient_audit_user_events_total", action="cell.execute", outcome="ok") == 3
    assert value(registry, "paitient_audit_user_events_total", action="kernel.stop", outcome="error") == 1
    assert "alice" not in text(registry) and str(ALICE.uid) not in text(registry)


def test_the_trail_numbers_follow_every_writer(site, record):
    send, registry = record
    send(action="cell.execute", object="k1")
    before = value(registry, "paitient_audit_records")
    size = value(registry, "paitient_audit_trail_bytes")
    emit(site, actor="system", action="ledger.settle", object="onc/bc")  # another root-side process records
    assert value(registry, "paitient_audit_records") == before + 1 == read_head(site.state_dir / "audit")["seq"]
    assert value(registry, "paitient_audit_trail_bytes") > size
    assert time.time() - value(registry, "paitient_audit_last_record_timestamp_seconds") < 60


def test_an_event_the_trail_cannot_take_is_counted(site, record):
    send, registry = record
    send(action="cell.execute", object="k1")
    trail = site.state_dir / "audit"
    for f in trail.iterdir():
        f.unlink()
    trail.rmdir()
    trail.write_text("not a folder: the trail cannot be written")
    with pytest.raises(ChannelError, match="cannot be written"):
        send(action="cell.execute", object="k2")
    assert value(registry, "paitient_audit_append_failures_total") == 1
    assert value(registry, "paitient_audit_append_seconds_count") == 1
    assert value(registry, "paitient_audit_last_record_timestamp_seconds") == 0  # the scrape still answers
