"""The daily byte budget of an account's server and kernels, for real: a real audit service as root on a site
with a 1 MiB budget, real accounts sending over the real socket (finding F2: one researcher flooded the trail).

- past its budget an account's events are still written (actor, action, object, outcome, time), their
  details replaced by length and SHA-256, so the trail grows by at most the budget plus small records;
  no event is refused for it, and one ``audit.budget`` record says the budget was reached;
- another account's records are untouched, and a root-side caller's are never cut;
- the counts survive a restart of the service;
- a sender inside a kernel (another pid namespace) may send only small details.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from paitient.config import load
from paitient.registry import Member, Registry
from paitient.server import audit as client
from paitient.services.audit.writer import trail_files
from tests.trail import trail_records

BUDGET = 1 << 20
BIG = {f"k{i}": chr(ord("a") + i) * 60_000 for i in range(4)}
"""What the red team sent: 4 keys of 60,000 characters (240 kB of JSON), under the 256 KiB cap of one event."""
SENDS = 10
SMALL_RECORD = 2048
"""An upper bound of one record whose details were cut, or of the ``audit.budget`` record."""


def canonical(details: dict) -> bytes:
    return json.dumps(details, sort_keys=True, separators=(",", ":")).encode()


@pytest.fixture
def site(world_tmp):
    path = world_tmp / "site.toml"
    path.write_text(f'[workspace]\nstate_dir = "{world_tmp / "state"}"\n\n[audit]\nuser_daily_bytes = {BUDGET}\n')
    site = load(str(path))
    site.state_dir.mkdir(parents=True, exist_ok=True)
    return site


@pytest.fixture
def accounts(site, make_system_user):
    alice, bob = make_system_user("alice"), make_system_user("bob")
    registry = Registry.for_state_dir(site.state_dir)
    registry.put(Member(username="alice", account=alice.pw_name, uid=alice.pw_uid, projects=()))
    registry.put(Member(username="bob", account=bob.pw_name, uid=bob.pw_uid, projects=()))
    return alice, bob


def start(site):
    proc = subprocess.Popen(
        [sys.executable, "-m", "paitient.cli", "service", "audit", f"--site={site.source}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    sock = site.run_dir / "audit.sock"
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "audit service did not start"
        time.sleep(0.05)
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@pytest.fixture
def service(site, accounts):
    proc = start(site)
    yield proc
    stop(proc)


def send_as(site, user, n: int, details: dict, *, unshare: bool = False, obj: str = "k{i}") -> list[str]:
    """Send ``n`` cell.execute events as ``user`` (a server would), the ``i``-th with ``obj.format(i=i)`` as its
    object; one line per send: ``OK seq`` or ``REFUSED``."""
    code = textwrap.dedent(f"""
        import json, sys
        from paitient.server.audit import send
        from paitient.services.audit import AuditError
        details = json.loads(sys.stdin.read())
        for i in range({n}):
            try:
                answer = send({str(site.run_dir)!r}, action="cell.execute", object={obj!r}.format(i=i), details=details)
                print("OK", answer["seq"])
            except AuditError as e:
                print("REFUSED", e.code, e)
    """)
    argv = [
        "setpriv",
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--init-groups",
        sys.executable,
        "-c",
        code,
    ]
    out = subprocess.run(
        ["unshare", "--pid", "--fork", *argv] if unshare else argv,
        input=json.dumps(details),
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": "/"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def trail_bytes(site) -> int:
    return sum(path.stat().st_size for _, path in trail_files(site.state_dir / "audit"))


def details_bytes(record: dict) -> int:
    details = {k: v for k, v in record["details"].items() if k != "peer"}
    return len(canonical(details))


def test_an_account_past_its_budget_is_recorded_with_details_cut_and_never_refused(site, accounts, service):
    alice, _ = accounts
    before = trail_bytes(site)
    lines = send_as(site, alice, SENDS, BIG)
    assert [line.split()[0] for line in lines] == ["OK"] * SENDS, lines  # no cell refused for the budget
    grown = trail_bytes(site) - before
    assert grown <= BUDGET + (SENDS + 1) * SMALL_RECORD + 4 * 1024, grown

    cells = [r for r in trail_records(site, action="cell.execute") if r["actor"] == "alice"]
    assert [r["object"] for r in cells] == [f"k{i}" for i in range(SENDS)]  # every event is in the trail
    kept = [r for r in cells if "over_budget" not in r["details"]]
    cut = [r for r in cells if r["details"].get("over_budget")]
    assert len(kept) == BUDGET // len(canonical(BIG)) == 4 and len(cut) == SENDS - 4
    assert all(r["details"]["k0"] == BIG["k0"] for r in kept)
    assert sum(map(details_bytes, kept)) <= BUDGET
    for r in cut:
        assert r["outcome"] == "ok" and r["time"] and r["details"]["peer"]["uid"] == alice.pw_uid
        assert r["details"]["length"] == len(canonical(BIG))
        assert r["details"]["sha256"] == hashlib.sha256(canonical(BIG)).hexdigest()
        assert r["details"]["budget_bytes"] == BUDGET and "k0" not in r["details"]

    notices = trail_records(site, action="audit.budget")
    assert len(notices) == 1, notices  # once, though six events were cut
    assert notices[0]["actor"] == "alice" and notices[0]["details"]["budget_bytes"] == BUDGET
    assert notices[0]["seq"] == cut[0]["seq"] - 1  # written with the first event it cut

    # more cut events within the hour add no second notice; small details that still fit are kept
    lines = send_as(site, alice, 3, BIG)
    assert [line.split()[0] for line in lines] == ["OK"] * 3
    assert len(trail_records(site, action="audit.budget")) == 1
    assert trail_records(site, action="cell.execute")[-1]["details"]["over_budget"] is True
    send_as(site, alice, 1, {"code": "1 + 1"})
    assert trail_records(site, action="cell.execute")[-1]["details"]["code"] == "1 + 1"


def test_the_bytes_of_an_events_object_are_charged_and_a_long_one_is_cut_past_the_budget(site, accounts, service):
    """Attack: objects of 1,024 emoji and no details. Only details were charged, and the trail writes each emoji
    as a 12-byte escape: 600 such records grew the trail by 7.6 MB and charged the account nothing (some 50 GB
    a day at the request rate). The object is now charged as the trail writes it, and past the budget it is
    cut to 128 bytes, its length and SHA-256 in the details."""
    alice, _ = accounts
    emoji = "\U0001f600" * 1020  # and 4 digits: the longest object a service keeps (1,024 characters)
    per_event = len(json.dumps(emoji + "0000")) + len(canonical({}))
    assert per_event > 12_000
    send_as(site, alice, 4, BIG)  # most of the budget
    fit = (BUDGET - 4 * (len(canonical(BIG)) + len('"k0"'))) // per_event
    before = trail_bytes(site)
    lines = send_as(site, alice, fit + 6, {}, obj=emoji + "{i:04d}")
    assert [line.split()[0] for line in lines] == ["OK"] * (fit + 6), lines
    assert trail_bytes(site) - before <= fit * (per_event + SMALL_RECORD) + 7 * SMALL_RECORD

    mine = [r for r in trail_records(site, action="cell.execute") if r["actor"] == "alice"][4:]
    assert [r["object"] for r in mine[:fit]] == [f"{emoji}{i:04d}" for i in range(fit)]
    for i, r in enumerate(mine[fit:], start=fit):
        assert len(json.dumps(r["object"])) <= 128 and r["object"].endswith("...")
        assert emoji.startswith(r["object"][:-3]) and len(r["object"]) > 5
        assert r["details"]["over_budget"] is True and r["details"]["object_length"] == 1024
        whole = f"{emoji}{i:04d}".encode("utf-8", "surrogatepass")
        assert r["details"]["object_sha256"] == hashlib.sha256(whole).hexdigest()
    assert [n["actor"] for n in trail_records(site, action="audit.budget")] == ["alice"]


def test_another_account_and_root_are_untouched_by_one_accounts_budget(site, accounts, service):
    alice, bob = accounts
    send_as(site, alice, SENDS, BIG)
    lines = send_as(site, bob, 2, BIG)
    assert [line.split()[0] for line in lines] == ["OK", "OK"]
    bobs = [r for r in trail_records(site, action="cell.execute") if r["actor"] == "bob"]
    assert len(bobs) == 2 and all(r["details"]["k3"] == BIG["k3"] for r in bobs)

    # a root-side caller of the socket (this test runs as root): past any budget, never cut
    for i in range(SENDS):
        client.send(site.run_dir, action="cell.execute", object=f"root{i}", details=BIG)
    roots = [r for r in trail_records(site, action="cell.execute") if r["object"].startswith("root")]
    assert len(roots) == SENDS and all(r["details"]["k1"] == BIG["k1"] for r in roots)
    assert [r["actor"] for r in trail_records(site, action="audit.budget")] == ["alice"]


def test_the_budget_survives_a_restart_of_the_service(site, accounts, service):
    alice, _ = accounts
    send_as(site, alice, 5, BIG)  # 4 kept, 1 cut
    stop(service)
    assert (site.state_dir / "audit-budget.json").stat().st_mode & 0o777 == 0o600
    again = start(site)
    try:
        send_as(site, alice, 1, BIG)
    finally:
        stop(again)
    last = trail_records(site, action="cell.execute")[-1]
    assert last["actor"] == "alice" and last["details"]["over_budget"] is True
    assert len(trail_records(site, action="audit.budget")) == 1  # no second notice within the hour either


def test_a_kernel_may_send_only_small_details(site, accounts, service):
    alice, _ = accounts
    # A sandboxed kernel runs in its own pid namespace; the workspace's kernels report nothing themselves,
    # the user's server records the cells. So a kernel's details are cut at [audit] kernel_details_bytes.
    lines = send_as(site, alice, 1, {"code": "x" * 10_000}, unshare=True)
    assert lines[0].startswith("OK"), lines
    rec = trail_records(site, action="cell.execute")[-1]
    assert rec["details"]["peer"]["origin"] == "namespaced"
    assert rec["details"]["dropped"] is True and "code" not in rec["details"]
    # ... while the user's server (same uid, the service's pid namespace) may record the cell's code
    send_as(site, alice, 1, {"code": "x" * 10_000})
    rec = trail_records(site, action="cell.execute")[-1]
    assert rec["details"]["peer"]["origin"] == "host" and rec["details"]["code"] == "x" * 10_000
