"""The services over the pod network: a kernel's call through the pod's relay and the services' gateway
reaches the real ledger, audit trail and airlock as its user, with what the relay saw of it; and the
attacks, each refused for its own reason."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from paitient import podtokens
from paitient.channel import Peer
from paitient.services.gateway import FILES_PER_POD, PER_ADDRESS, SEALS, sealed_file
from paitient.services.kit.channel import ChannelServer
from paitient.services.ledger.service import PodReports
from paitient.services.ledger.store import Ledger
from tests.relay.conftest import as_account, call_as, connect, gateway_call
from tests.trail import trail_records

RECORD = {"op": "record", "args": {"action": "cell.execute", "object": "cell 1", "details": {"n": 1}}}
RESERVE = {"op": "reserve", "args": {"project": "oncology", "dataset": "breast_cancer", "epsilon": 0.5, "delta": 1e-7}}


def header(pod, **changes):
    base = {
        "token": pod.token,
        "service": "ledger",
        "op": "budget",
        "args": {},
        "origin": "kernel",
        "pid": 1,
        "start": None,
        "files": [],
    }
    return {**base, **changes}


def last_record(pod, action):
    records = trail_records(pod.site, action=action)
    assert records, f"no {action} record"
    return records[-1]


def test_a_kernels_call_reaches_the_services_as_its_user_with_origin_kernel(pod):
    with pod.relay():
        sent = call_as(pod.user, pod.sock("audit"), RECORD)
        assert "ok" in sent, sent
        rec = last_record(pod, "cell.execute")
        assert rec["actor"] == "alice"
        assert rec["details"]["peer"] == {
            "pid": sent["pid"],
            "uid": pod.user.pw_uid,
            "origin": "kernel",
            "pod": pod.identity.pod,
        }

        reserved = call_as(pod.user, pod.sock("ledger"), RESERVE)
        assert "ok" in reserved, reserved
        rec = last_record(pod, "ledger.reserve")
        assert rec["actor"] == "alice" and rec["details"]["pod"] == pod.identity.pod
        assert rec["details"]["pid"] == reserved["pid"]

        data = b"age,count\n40,12\n50,15\n"
        upload = pod.tmp / "table.csv"
        upload.write_bytes(data)
        os.chmod(upload, 0o644)
        checked = call_as(
            pod.user,
            pod.sock("airlock"),
            {
                "op": "check",
                "args": {"kind": "table", "project": "oncology", "filename": "table.csv"},
                "files": [str(upload)],
            },
        )
        rec = last_record(pod, "airlock.check_preview")
        assert rec["actor"] == "alice", (checked, rec)
        # the airlock read the bytes the relay sent (from a sealed in-memory file), not a path
        assert rec["details"].get("upload_sha256") == hashlib.sha256(data).hexdigest(), rec


def test_a_caller_in_another_pid_namespace_is_the_server(pod):
    # the relay in a pid namespace of its own (the kernels container's), the caller outside it (the server's)
    with pod.relay(own_pids=True):
        sent = call_as(pod.user, pod.sock("audit"), RECORD)
        assert "ok" in sent, sent
        peer = last_record(pod, "cell.execute")["details"]["peer"]
        assert peer["origin"] == "server" and peer["pid"] == 0


def test_a_forged_origin_pid_or_caller_in_the_request_is_ignored(pod):
    with pod.relay():
        forged = {
            "op": "record",
            "args": RECORD["args"],
            "origin": "server",
            "pid": 1,
            "on_behalf": {"uid": pod.other.pw_uid, "pod": "x", "origin": "server", "pid": 1, "start": None},
        }
        sent = call_as(pod.user, pod.sock("audit"), {"raw": forged})
        assert "ok" in sent, sent
        rec = last_record(pod, "cell.execute")
        assert rec["actor"] == "alice"  # not bob, whose uid the request named
        assert rec["details"]["peer"]["origin"] == "kernel" and rec["details"]["peer"]["pid"] == sent["pid"]


def test_another_uid_at_the_relay_is_refused_by_its_peer_credentials(pod):
    with pod.relay():
        sock = pod.sock("audit")
        assert (sock.stat().st_mode & 0o777, sock.stat().st_uid) == (0o600, pod.user.pw_uid)
        assert call_as(pod.other, sock, RECORD)["code"] == "unavailable"  # 0600: it cannot connect
        os.chmod(sock, 0o666)
        refused = call_as(pod.other, sock, RECORD)
        assert refused["code"] == "forbidden", refused
        assert f"uid {pod.other.pw_uid} is not this pod's uid {pod.user.pw_uid}" in refused["error"]
        refused = call_as(None, sock, RECORD)
        assert refused["code"] == "forbidden" and "uid 0 is not this pod's uid" in refused["error"], refused
    assert not trail_records(pod.site, action="cell.execute")


def test_a_call_without_a_token_with_an_unknown_or_a_revoked_one_is_refused(pod):
    no_token = gateway_call(pod, header(pod, token=""))
    assert no_token["code"] == "forbidden" and "carries no pod token" in no_token["error"], no_token
    no_token = gateway_call(pod, {k: v for k, v in header(pod).items() if k != "token"})
    assert no_token["code"] == "forbidden" and "carries no pod token" in no_token["error"], no_token
    unknown = gateway_call(pod, header(pod, token="A" * 43))
    assert unknown["code"] == "forbidden" and "not one the hub issued" in unknown["error"], unknown
    # the pod's own token works, until the hub revokes it (its pod stopped) or mints the next (a new pod)
    assert gateway_call(pod, header(pod))["ok"] is True
    podtokens.revoke(pod.tokens_file(), "alice", group=pod.gateway.pw_gid)
    revoked = gateway_call(pod, header(pod))
    assert revoked["code"] == "forbidden" and "not one the hub issued" in revoked["error"], revoked
    newer, _ = podtokens.mint(pod.tokens_file(), "alice", pod.user.pw_uid, group=pod.gateway.pw_gid)
    assert gateway_call(pod, header(pod, token=newer))["ok"] is True
    assert gateway_call(pod, header(pod))["code"] == "forbidden"


def test_another_pods_token_acts_for_that_pods_user_only(pod):
    bobs, _ = podtokens.mint(pod.tokens_file(), "bob", pod.other.pw_uid, group=pod.gateway.pw_gid)
    # bob's token does not make its holder alice, whatever the call says: alice's project stays hers
    refused = gateway_call(pod, header(pod, token=bobs, op="reserve", args=RESERVE["args"]))
    assert refused["code"] == "forbidden" and "not a member of project 'oncology'" in refused["error"], refused
    budget = gateway_call(pod, header(pod, token=bobs))
    assert budget["ok"] is True and budget["result"]["user"] == "bob", budget


def test_a_caller_named_in_a_request_is_taken_from_the_gateway_only(pod):
    on_behalf = {"uid": pod.user.pw_uid, "pod": pod.identity.pod, "origin": "kernel", "pid": 1, "start": None}
    for who in (pod.other, None):  # a member's process, root
        refused = call_as(who, pod.site.run_dir / "ledger.sock", {**RESERVE, "on_behalf": on_behalf})
        assert refused["code"] == "forbidden", refused
        assert "only from the workspace's gateway" in refused["error"]
    # the gateway's own uid, speaking for nobody, is refused too: it is no workspace member
    refused = call_as(pod.gateway, pod.site.run_dir / "ledger.sock", RESERVE)
    assert refused["code"] == "forbidden" and "only on behalf of a pod's caller" in refused["error"], refused
    # and the gateway cannot speak for root
    root = call_as(pod.gateway, pod.site.run_dir / "ledger.sock", {**RESERVE, "on_behalf": {**on_behalf, "uid": 0}})
    assert root["code"] == "bad_request" and "not root" in root["error"], root
    assert not trail_records(pod.site, action="ledger.reserve")
    # each attempt to speak for another is on record, by the uid that tried
    refusals = {(r["actor"], r["details"]["code"]) for r in trail_records(pod.site, action="channel.refused")}
    assert {("bob", "forbidden"), ("uid:0", "forbidden"), (f"uid:{pod.gateway.pw_uid}", "bad_request")} <= refusals


def test_a_file_over_the_services_limit_is_refused(pod):
    big = pod.tmp / "big.csv"
    big.write_bytes(b"x" * 2000)
    os.chmod(big, 0o644)
    with pod.relay("--airlock-max-bytes=1000"):
        request = {"op": "check", "args": {"kind": "table", "project": "oncology"}, "files": [str(big)]}
        refused = call_as(pod.user, pod.sock("airlock"), request)
        assert refused["code"] == "too_large", refused
        assert "the file has 2000 bytes; the airlock service takes at most 1000 bytes" in refused["error"]
        # a service that takes no file refuses one
        refused = call_as(pod.user, pod.sock("ledger"), {**RESERVE, "files": [str(big)]})
        assert refused["code"] == "too_large" and "takes at most 0 bytes" in refused["error"], refused
    # the gateway refuses a size over the limit before it reads a byte of it
    over = pod.site.airlock.max_bytes + 1
    refused = gateway_call(pod, header(pod, service="airlock", op="check", files=[over]))
    assert refused["code"] == "too_large" and f"this one has {over}" in refused["error"], refused


def test_the_files_the_gateway_holds_for_a_pod_are_bounded_per_call_and_per_pod(pod):
    """Attack: the gateway holds a call's files in memory (sealed memfds, the hub pod's memory, not the pod's)
    and checked each file against the service's limit, not their sum nor how many calls a pod had under way.
    One sparse 32 MiB file passed four times in four calls at once became 512 MiB there (at the default
    [airlock] max_bytes, 32 calls of 4 files: 64 GiB). Now a call's files total at most the limit, and a pod's
    calls under way at most FILES_PER_POD times it: the next is refused before a byte of it is read."""
    limit = pod.site.airlock.max_bytes
    refused = gateway_call(pod, header(pod, service="airlock", op="check", files=[limit, limit]))
    assert refused["code"] == "too_large" and f"these have {2 * limit}" in refused["error"], refused
    held = []
    try:
        for _ in range(FILES_PER_POD):  # calls whose files come slowly: one byte of each, then nothing
            s = connect(pod)
            s.sendall(json.dumps(header(pod, service="airlock", op="check", files=[limit])).encode() + b"\nx")
            held.append(s)
        deadline = time.monotonic() + 10
        while True:
            refused = gateway_call(pod, header(pod, service="airlock", op="check", files=[8]), b"a,b\n1,2\n")
            if refused.get("code") == "too_many_connections" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert refused["code"] == "too_many_connections", refused
        assert f"takes at most {FILES_PER_POD * limit} at once" in refused["error"]
    finally:
        for s in held:
            s.close()
    # once those calls are gone, their bytes are given back: a call with a file is served again
    args = {"kind": "table", "project": "oncology"}
    deadline = time.monotonic() + 10
    while True:
        answer = gateway_call(pod, header(pod, service="airlock", op="check", args=args, files=[8]), b"a,b\n1,2\n")
        if answer.get("ok") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answer["ok"] is True, answer


def test_a_reservation_from_a_pod_counts_in_full_once_its_pod_stops_reporting_its_kernel(pod):
    with pod.relay():
        reserved = call_as(pod.user, pod.sock("ledger"), RESERVE)  # a kernel that exits without settling
        assert "ok" in reserved, reserved
        rid = reserved["ok"]["reservation"]
        deadline = time.monotonic() + 30
        state = "reserved"
        while state == "reserved" and time.monotonic() < deadline:
            time.sleep(0.3)
            gateway_call(pod, header(pod))  # a budget query sweeps
            ledger = Ledger(pod.site)
            try:
                state = (ledger.run(rid) or {}).get("state")
            finally:
                ledger.close()
        assert state == "lost"
    lost = [r for r in trail_records(pod.site, action="ledger.settle") if r["details"].get("state") == "lost"]
    assert [r["details"]["reservation"] for r in lost] == [rid]


def test_a_live_kernels_reservation_stays_while_its_pod_reports_it(pod):
    with pod.relay():
        # a kernel that reserves and keeps running: the relay reports it, the reservation stays
        script = (
            "import json, sys, time; from paitient import channel; "
            f"r = channel.call(sys.argv[1], 'reserve', {RESERVE['args']!r}); print(json.dumps(r), flush=True); "
            "time.sleep(60)"
        )
        proc = subprocess.Popen(
            [*as_account(pod.user), sys.executable, "-c", script, str(pod.sock("ledger"))],
            stdout=subprocess.PIPE,
            text=True,
            env={"PATH": "/usr/bin:/bin"},
        )
        try:
            rid = json.loads(proc.stdout.readline())["reservation"]
            for _ in range(5):
                time.sleep(0.4)
                gateway_call(pod, header(pod))
            ledger = Ledger(pod.site)
            try:
                assert ledger.run(rid)["pod"] == pod.identity.pod
                assert ledger.run(rid)["state"] == "reserved"
            finally:
                ledger.close()
        finally:
            proc.kill()
            proc.wait(10)


def test_a_pods_reservations_live_only_while_its_reports_are_fresh():
    now = [100.0]
    reports = PodReports(stale=30.0, clock=lambda: now[0])
    assert reports.alive("p", 7, 70)  # nothing heard yet since the ledger started: its grace
    now[0] += 31
    assert not reports.alive("p", 7, 70)  # still nothing: counted in full
    reports.report("p", frozenset({(7, 70)}))
    assert reports.alive("p", 7, 70)
    assert not reports.alive("p", 7, 71)  # the same pid, another process (a pid given again)
    assert not reports.alive("q", 7, 70)  # another pod's kernel of that pid
    now[0] += 30.5
    assert not reports.alive("p", 7, 70)  # the pod stopped reporting


def test_a_file_handed_to_a_service_is_sealed(tmp_path):
    data = b"exactly these bytes"
    it = iter([data])

    def receive_into(view):
        chunk = next(it, b"")
        view[: len(chunk)] = chunk
        return len(chunk)

    fd = sealed_file("test", receive_into, len(data))
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == SEALS
        assert os.read(fd, 100) == data
        with pytest.raises(PermissionError) as e:
            os.write(fd, b"more")
        assert e.value.errno == errno.EPERM
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def test_a_server_refuses_to_take_the_gateway_as_root(tmp_path):
    with pytest.raises(ValueError, match="must not run as root"):
        ChannelServer(tmp_path / "x.sock", {}, delegate_uid=0)
    assert Peer(1, 2, 3).delegated is False


def test_one_address_holding_connections_open_does_not_take_the_gateway_from_others(pod):
    """Connections that send nothing (a pod's server without the token, say) are capped per address: the one
    over the cap is closed unanswered, and once they go, calls are served again."""
    held = [socket.create_connection(("127.0.0.1", pod.gateway_port)) for _ in range(PER_ADDRESS)]
    try:
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", pod.gateway_port), timeout=10) as extra:
            assert extra.recv(100) == b""  # closed, no answer
    finally:
        for s in held:
            s.close()
    # the gateway notices the held connections close a moment later: until then a call is closed unanswered
    deadline = time.monotonic() + 10
    while True:
        try:
            answer = gateway_call(pod, header(pod))
        except OSError as e:  # (the TLS handshake's EOF included)
            answer = {"ok": False, "closed": repr(e)}
        if answer.get("ok") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answer["ok"] is True, answer


def test_the_limits_the_relay_and_gateway_apply_are_the_services_own(pod):
    from paitient.services.gateway import JOBS_MAX_BYTES, file_limits
    from paitient.services.jobs.service import MAX_GRAPH_BYTES
    from paitient.services.relay import RelayApp

    assert JOBS_MAX_BYTES == MAX_GRAPH_BYTES
    assert file_limits(pod.site)["airlock"] == pod.site.airlock.max_bytes == RelayApp().airlock_max_bytes
