"""The ledger service over its real unix socket: identity from peer credentials, concurrency, crash safety."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing

import pytest

from paitient.channel import ChannelError, call
from paitient.kernel.ledger import BudgetExceeded, LedgerClient
from paitient.services.ledger.metrics import ledger_registry
from paitient.services.ledger.store import Ledger, db_path
from tests import workspacegroup
from tests.ledger.conftest import register, start_service_process
from tests.scrape import value

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", workspacegroup.setpriv_groups()]


def as_nobody(code: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*NOBODY, sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


def test_kernel_acts_only_for_its_users_projects(service, site, state_dir):
    register(state_dir, "alice", 65534, ("oncology",))
    out = as_nobody(f"""
        import json
        from paitient.kernel.ledger import LedgerClient, ChannelError
        c = LedgerClient({str(site.run_dir)!r})
        r = c.reserve("oncology", "breast_cancer", 1.0, 1e-6, run_id="t")
        res = {{"reserved": r["username"], "pid": r.get("pid")}}
        for project, ds in (("cardio", "diabetes"),):
            try:
                c.reserve(project, ds, 1.0, 1e-6)
            except ChannelError as e:
                res["foreign"] = [e.code, str(e)]
        res["budget"] = sorted(c.budget()["projects"])
        try:
            c.records(project="cardio")
        except ChannelError as e:
            res["records_foreign"] = e.code
        print(json.dumps(res))
    """)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["reserved"] == "alice"  # the user comes from the uid, not from the request
    assert res["pid"] is None  # process details are not handed out
    assert res["foreign"][0] == "forbidden" and "not a member of project 'cardio'" in res["foreign"][1]
    assert res["budget"] == ["oncology"]
    assert res["records_foreign"] == "forbidden"
    run = service.ledger.runs("oncology")[0]
    assert run["username"] == "alice" and run["pid"] > 0


def test_unknown_uid_is_refused(service, site):
    out = as_nobody(f"""
        from paitient.kernel.ledger import LedgerClient, ChannelError
        try:
            LedgerClient({str(site.run_dir)!r}).reserve("oncology", "breast_cancer", 1.0, 1e-6)
        except ChannelError as e:
            print(e.code, e)
    """)
    assert out.stdout.startswith("unknown_user uid 65534 is not a paitient user"), out.stdout + out.stderr
    assert service.ledger.runs() == []


def test_claims_in_the_request_are_refused(service, site, state_dir):
    register(state_dir, "alice", 65534, ("oncology",))
    out = as_nobody(f"""
        from paitient.channel import call, ChannelError
        try:
            call({str(site.run_dir / "ledger.sock")!r}, "reserve", {{"project": "oncology", "dataset": "gbsg2",
                 "epsilon": 1.0, "delta": 1e-7, "user": "bob"}})
        except ChannelError as e:
            print(e.code, e)
    """)
    assert out.stdout.startswith("bad_request unknown argument(s) user"), out.stdout + out.stderr


def test_refusal_over_socket_carries_the_numbers(service, site, state_dir):
    register(state_dir, "root-tester", 0, ("oncology",))
    c = LedgerClient(site.run_dir)
    c.reserve("oncology", "gbsg2", 1.5, 1e-7)
    with pytest.raises(BudgetExceeded, match="epsilon 1 asked, but oncology/gbsg2 has 0.5 left of 2"):
        c.reserve("oncology", "gbsg2", 1.0, 1e-7)


def test_dead_reserver_counts_in_full(service, site, state_dir):
    register(state_dir, "alice", 65534, ("oncology",))
    out = as_nobody(f"""
        from paitient.kernel.ledger import LedgerClient
        print(LedgerClient({str(site.run_dir)!r}).reserve("oncology", "gbsg2", 0.75, 1e-7)["reservation"])
    """)
    rid = out.stdout.strip()
    assert rid, out.stderr
    # the process has exited: the next question to the ledger finds the reservation lost, counted in full
    b = call(site.run_dir / "ledger.sock", "budget", {"project": "oncology"})
    gbsg2 = {x["dataset"]: x for x in b["projects"]["oncology"]}["gbsg2"]
    assert (gbsg2["epsilon_spent"], gbsg2["epsilon_reserved"]) == (0.75, 0.0)
    assert service.ledger.run(rid)["state"] == "lost"


def test_concurrent_reservations_never_exceed_the_budget(service, site, state_dir):
    """Eight processes (as another uid) race for gbsg2's epsilon 2.0 in steps of 0.07: exactly 28 fit."""
    register(state_dir, "alice", 65534, ("oncology",))
    code = f"""
        import sys, time
        from paitient.kernel.ledger import LedgerClient, BudgetExceeded
        c = LedgerClient({str(site.run_dir)!r})
        got = refused = 0
        for _ in range(10):
            try:
                c.reserve("oncology", "gbsg2", 0.07, 1e-9); got += 1
            except BudgetExceeded:
                refused += 1
        print(got, refused, flush=True)
        sys.stdin.read()   # stay alive (a live kernel) until the test has looked
    """
    procs = [
        subprocess.Popen(
            [*NOBODY, sys.executable, "-c", textwrap.dedent(code)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    try:
        counts = [tuple(map(int, p.stdout.readline().split())) for p in procs]
        assert sum(g for g, _ in counts) == 28
        assert sum(r for _, r in counts) == 80 - 28
        b = {x["dataset"]: x for x in service.ledger.budget("oncology")}["gbsg2"]
        assert b["epsilon_reserved"] == pytest.approx(28 * 0.07) and b["epsilon_reserved"] <= 2.0
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=30)


def test_kill_9_of_the_service_loses_nothing_acknowledged(site, state_dir, world_tmp):
    """A client reserves as fast as it can; the service gets SIGKILL mid-stream, three times."""
    register(state_dir, "alice", 65534, ("oncology",))
    Ledger(site).set_budget("oncology", "breast_cancer", 1e6, 0.5, by="test")
    acknowledged: list[str] = []
    log = world_tmp / "ledger.log"
    code = f"""
        from paitient.kernel.ledger import LedgerClient, ChannelError
        c = LedgerClient({str(site.run_dir)!r}, timeout=10)
        while True:
            try:
                print(c.reserve("oncology", "breast_cancer", 0.001, 1e-12)["reservation"], flush=True)
            except ChannelError:
                break
    """
    for delay in (0.7, 1.3, 2.1):
        service = start_service_process(site, log_path=log)
        client = subprocess.Popen(
            [*NOBODY, sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True
        )
        time.sleep(delay)
        os.kill(service.pid, signal.SIGKILL)
        service.wait(timeout=30)
        out, _ = client.communicate(timeout=60)
        acknowledged += out.split()
        (site.run_dir / "ledger.sock").unlink(missing_ok=True)
    assert len(acknowledged) > 30, log.read_text()[-2000:]
    if not site.database.url:
        with sqlite3.connect(db_path(site)) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    ledger = Ledger(site)
    stored = {r["id"] for r in ledger.runs("oncology", "breast_cancer")}
    assert set(acknowledged) <= stored
    # the clients have exited: every reservation is now counted as spent, none twice
    service = start_service_process(site, log_path=log)
    try:
        b = {x["dataset"]: x for x in call(site.run_dir / "ledger.sock", "budget")["projects"]["oncology"]}
        assert b["breast_cancer"]["epsilon_spent"] == pytest.approx(0.001 * len(stored))
        assert b["breast_cancer"]["epsilon_reserved"] == 0
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
    assert not (site.run_dir / "ledger.sock").exists()


def test_record_by_hash_is_limited_to_own_projects(service, site, state_dir):
    register(state_dir, "alice", 65534, ("cardio",))
    row = service.ledger.reserve("oncology", "breast_cancer", 1.0, 1e-6, user="carol")
    service.ledger.settle(row, 1.0, record={"weights_sha256": "ef" * 32})
    assert call(site.run_dir / "ledger.sock", "record_by_hash", {"sha256": "ef" * 32})["id"] == row  # root
    out = as_nobody(f"""
        from paitient.kernel.ledger import LedgerClient
        print(LedgerClient({str(site.run_dir)!r}).record_by_hash({"ef" * 32!r}))
    """)
    assert out.stdout.strip() == "None", out.stderr
    with pytest.raises(ChannelError, match="64 hex digits"):
        call(site.run_dir / "ledger.sock", "record_by_hash", {"sha256": "xyz"})


def test_hub_service_entry_and_scopes(site):
    from paitient.services.ledger.service import custom_scopes, hub_service, role_scopes

    entry = hub_service(site, "/opt/paitient/venv/bin/python", port=18123)
    assert entry["name"] == "ledger" and entry["url"] == "http://127.0.0.1:18123"
    assert entry["command"] == [
        "/opt/paitient/venv/bin/python",
        "-m",
        "paitient.cli",
        "service",
        "ledger",
        f"--state-dir={site.state_dir}",
        f"--site={site.source}",
    ]
    assert set(custom_scopes()) == {"custom:ledger:read"}
    assert "access:services!service=ledger" in role_scopes()


def test_reservations_and_refusals_reach_the_audit_trail(service, site, state_dir):
    from paitient.services.audit import trail_dir
    from paitient.services.audit.query import Filter, select

    register(state_dir, "root-tester", 0, ("cardio",))
    c = LedgerClient(site.run_dir)
    rid = c.reserve("cardio", "diabetes", 4.0, 1e-6)["reservation"]
    with pytest.raises(BudgetExceeded):
        c.reserve("cardio", "diabetes", 2.0, 1e-6)
    c.settle(rid, 3.5, record={"weights_sha256": "12" * 32})
    records = select(trail_dir(site), Filter.parse(action="ledger"))
    got = [(r["actor"], r["action"], r["object"], r["outcome"]) for r in reversed(records)]
    assert got == [
        ("root-tester", "ledger.reserve", "cardio/diabetes", "ok"),
        ("root-tester", "ledger.reserve", "cardio/diabetes", "denied"),
        ("root-tester", "ledger.settle", "cardio/diabetes", "ok"),
    ]
    assert records[0]["details"]["weights_sha256"] == "12" * 32 and records[0]["details"]["project"] == "cardio"


def test_service_process_serves_socket_and_page_and_stops_cleanly(site, world_tmp):
    import requests

    from paitient.services.kit.process import free_port

    port = free_port()
    env = {
        **os.environ,
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
        "JUPYTERHUB_SERVICE_PREFIX": "/services/ledger/",
        "JUPYTERHUB_API_TOKEN": "test-token",
        "JUPYTERHUB_API_URL": "http://127.0.0.1:1/hub/api",
        "JUPYTERHUB_CLIENT_ID": "service-ledger",
        "JUPYTERHUB_OAUTH_CALLBACK_URL": "/services/ledger/oauth_callback",
        "JUPYTERHUB_BASE_URL": "/",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "paitient.cli",
            "service",
            "ledger",
            f"--site={site.source}",
            f"--state-dir={site.state_dir}",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                r = requests.get(f"http://127.0.0.1:{port}/services/ledger/", allow_redirects=False, timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "the ledger page did not start"
                time.sleep(0.1)
        assert r.status_code == 302 and r.headers["Location"].startswith("/hub/api/oauth2/authorize?")
        api = requests.get(f"http://127.0.0.1:{port}/services/ledger/api/budget", timeout=5)
        assert api.status_code == 403 and api.json()["status"] == 403
        answer = call(site.run_dir / "ledger.sock", "budget", {"project": "cardio"})
        assert answer["projects"]["cardio"][0]["epsilon_total"] == 5.0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert not (site.run_dir / "ledger.sock").exists()


def test_attacks_from_a_kernel_are_refused(service, site, state_dir):
    """A kernel tries to refund budget, settle another user's run, and overspend its own reservation."""
    register(state_dir, "alice", 65534, ("oncology",))
    register(state_dir, "carol", 0, ("oncology",))
    carols = LedgerClient(site.run_dir).reserve("oncology", "gbsg2", 1.0, 1e-7)["reservation"]
    out = as_nobody(f"""
        import json
        from paitient.kernel.ledger import LedgerClient, ChannelError
        c = LedgerClient({str(site.run_dir)!r})
        res = {{}}
        def attempt(name, fn):
            try:
                fn(); res[name] = "accepted"
            except ChannelError as e:
                res[name] = [e.code, str(e)]
        attempt("negative", lambda: c.reserve("oncology", "gbsg2", -5.0, 1e-7))
        attempt("nan", lambda: c._call("reserve", {{"project": "oncology", "dataset": "gbsg2",
                                                    "epsilon": float("nan"), "delta": 1e-7}}))
        attempt("others_run", lambda: c.settle({carols!r}, 0.0))
        attempt("job_in_capitals", lambda: c.reserve("oncology", "gbsg2", 0.1, 1e-7, run_id="JOB:x"))
        attempt("past_a_float", lambda: c._call("reserve", {{"project": "oncology", "dataset": "gbsg2",
                                                             "epsilon": 10**400, "delta": 1e-7}}))
        mine = c.reserve("oncology", "gbsg2", 0.5, 1e-7)["reservation"]
        attempt("overspend", lambda: c.settle(mine, 0.9))
        attempt("negative_spend", lambda: c.settle(mine, -1.0))
        print(json.dumps(res))
    """)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["negative"][0] == "bad_request" and "epsilon must be a positive number" in res["negative"][1]
    assert res["nan"][0] == "bad_request"
    assert res["others_run"] == ["forbidden", "this reservation belongs to another user"]
    assert res["job_in_capitals"] == ["bad_request", "run ids starting 'job:' belong to training jobs"]
    assert res["past_a_float"][0] == "bad_request" and "epsilon must be a finite number" in res["past_a_float"][1]
    assert res["overspend"][0] == "over_reservation" and "more than the 0.5 reserved" in res["overspend"][1]
    assert res["negative_spend"][0] == "over_reservation" and "must be a number >= 0" in res["negative_spend"][1]
    b = {x["dataset"]: x for x in service.ledger.budget("oncology")}["gbsg2"]
    assert b["epsilon_reserved"] + b["epsilon_spent"] == pytest.approx(1.5)  # carol's 1.0 and alice's 0.5 stand
    assert service.ledger.run(carols)["state"] == "reserved"


def test_total_answers_a_kernel_for_its_own_projects_only(service, site, state_dir):
    register(state_dir, "alice", 65534, ("oncology",))
    service.ledger.set_budget("oncology", "gbsg2", 1.5, 1e-6, by="sam")
    out = as_nobody(f"""
        import json
        from paitient.channel import call, ChannelError
        path = {str(site.run_dir / "ledger.sock")!r}
        res = {{"own": call(path, "total", {{"project": "oncology", "dataset": "gbsg2"}})}}
        try:
            call(path, "total", {{"project": "cardio", "dataset": "diabetes"}})
        except ChannelError as e:
            res["foreign"] = [e.code, str(e)]
        print(json.dumps(res))
    """)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["own"] == {"project": "oncology", "dataset": "gbsg2", "epsilon": 1.5, "delta": 1e-6, "source": "steward"}
    assert res["foreign"][0] == "forbidden" and "not a member of project 'cardio'" in res["foreign"][1]


def test_a_jobs_reservation_is_the_runners_to_settle(service, site, state_dir):
    """The runner (root) reserves for alice's job; alice's kernel can neither settle it, nor act as the runner,
    nor pass its own run off as a job."""
    register(state_dir, "alice", 65534, ("oncology",))
    job = call(
        site.run_dir / "ledger.sock",
        "reserve_job",
        {"project": "oncology", "dataset": "gbsg2", "epsilon": 1.0, "delta": 1e-7, "user": "alice", "job_id": "j-1"},
    )
    assert job["username"] == "alice"
    out = as_nobody(f"""
        import json
        from paitient.kernel.ledger import LedgerClient, ChannelError
        c = LedgerClient({str(site.run_dir)!r})
        res = {{}}
        def attempt(name, fn):
            try:
                fn(); res[name] = "accepted"
            except ChannelError as e:
                res[name] = [e.code, str(e)]
        attempt("settle_the_job", lambda: c.settle({job["reservation"]!r}, 0.0))
        attempt("settle_job", lambda: c.call("settle_job", {{"reservation": {job["reservation"]!r},
                                                            "epsilon_spent": 0.0}}))
        attempt("reserve_job", lambda: c.call("reserve_job", {{"project": "oncology", "dataset": "gbsg2",
            "epsilon": 0.1, "delta": 1e-8, "user": "alice", "job_id": "mine"}}))
        attempt("job_run_id", lambda: c.reserve("oncology", "gbsg2", 0.1, 1e-8, run_id="job:j-1"))
        print(json.dumps(res))
    """)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["settle_the_job"] == [
        "forbidden",
        "this reservation is a training job's: the jobs runner settles it with what its accountant spent",
    ]
    assert (
        res["settle_job"]
        == res["reserve_job"]
        == [
            "forbidden",
            "only the training-jobs runner reserves and settles for a job",
        ]
    )
    assert res["job_run_id"][0] == "bad_request" and "belong to training jobs" in res["job_run_id"][1]
    assert service.ledger.run(job["reservation"])["state"] == "reserved"
    settled = call(
        site.run_dir / "ledger.sock",
        "settle_job",
        {"reservation": job["reservation"], "epsilon_spent": 0.8, "record": {"weights_sha256": "d" * 64}},
    )
    assert settled["epsilon_spent"] == 0.8 and service.ledger.run(job["reservation"])["state"] == "settled"


def test_the_runner_reserves_only_within_the_users_projects_and_budget(service, site, state_dir):
    register(state_dir, "alice", 65534, ("oncology",))
    sock = site.run_dir / "ledger.sock"
    args = {"project": "cardio", "dataset": "diabetes", "epsilon": 1.0, "delta": 1e-7, "user": "alice", "job_id": "a"}
    with pytest.raises(ChannelError) as e:
        call(sock, "reserve_job", args)
    assert e.value.code == "forbidden" and "alice is not a member of project 'cardio'" in str(e.value)
    with pytest.raises(ChannelError) as e:
        call(sock, "reserve_job", {**args, "user": "mallory"})
    assert e.value.code == "unknown_user"
    # two jobs racing for the last budget: one gets it
    service.ledger.set_budget("oncology", "gbsg2", 1.0, 1e-6, by="sam")
    race = {**args, "project": "oncology", "dataset": "gbsg2", "epsilon": 0.7}
    import concurrent.futures

    def one(job_id):
        try:
            return call(sock, "reserve_job", {**race, "job_id": job_id})["reservation"]
        except ChannelError as err:
            return err.code

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(one, ["r-1", "r-2"]), key=str)
    assert sum(o == "budget_exceeded" for o in outcomes) == 1, outcomes


def test_no_budget_is_reserved_unrecorded_and_what_happened_while_the_trail_was_down_is_recorded_after(
    service, site, state_dir
):
    """Attack: reserve budget while auditing is down. Nothing is reserved until the trail records it; a
    settlement meanwhile stands, and every record reaches the trail, in order, once it is back."""
    from tests.trail import trail_down, trail_records

    register(state_dir, "root-tester", 0, ("cardio",))
    sock = site.run_dir / "ledger.sock"

    def reserve(epsilon: float) -> str:
        return call(sock, "reserve", {"project": "cardio", "dataset": "diabetes", "epsilon": epsilon, "delta": 1e-6})[
            "reservation"
        ]

    first = reserve(1.0)
    with trail_down(site):
        # the reservation is made, its record fails: released at once, spending nothing, and refused
        with pytest.raises(ChannelError, match="the budget was not reserved: the audit trail cannot record it") as e:
            reserve(2.0)
        assert e.value.code == "unavailable"
        (released,) = [r for r in service.ledger.runs("cardio") if r["id"] != first]
        assert (released["state"], released["epsilon_spent"], released["delta_spent"]) == ("settled", 0.0, 0.0)
        # a settlement is committed though its record waits
        settled = call(sock, "settle", {"reservation": first, "epsilon_spent": 0.5})
        assert settled["state"] == "settled" and service.ledger.run(first)["state"] == "settled"
        assert service.backlog.waiting == 3
        assert value(ledger_registry(site, service.ledger), "paitient_ledger_records_waiting") == 3
        # with records waiting, nothing more is reserved at all
        with pytest.raises(ChannelError, match="the budget was not reserved") as e:
            reserve(0.1)
        assert e.value.code == "unavailable" and len(service.ledger.runs("cardio")) == 2
        (diabetes,) = call(sock, "budget", {"project": "cardio"})["projects"]["cardio"]
        assert (diabetes["epsilon_spent"], diabetes["epsilon_reserved"]) == (0.5, 0.0)
    assert trail_records(site, "ledger.")[-1]["details"]["reservation"] == first  # only the first reservation
    third = reserve(0.25)
    got = [
        (r["action"], r["details"]["reservation"], r["details"].get("state"), "happened" in r["details"])
        for r in trail_records(site, "ledger.")
    ]
    assert got == [
        ("ledger.reserve", first, None, False),
        ("ledger.reserve", released["id"], None, True),
        ("ledger.settle", released["id"], "released", True),
        ("ledger.settle", first, None, True),
        ("ledger.reserve", third, None, False),
    ]
    assert service.backlog.waiting == 0
    assert value(ledger_registry(site, service.ledger), "paitient_ledger_records_waiting") == 0


def test_records_waiting_for_the_trail_outlive_a_kill_9_of_the_service(site, state_dir, world_tmp):
    """Attack: the trail is down, records of what the ledger did wait for it, and the service is killed with
    -9. Nothing is lost: the records were held in the ledger's database; the next service still reserves
    nothing until the trail has them, and writes them first, in order."""
    from tests.trail import trail_down, trail_records

    register(state_dir, "root-tester", 0, ("cardio",))
    sock = site.run_dir / "ledger.sock"
    log = world_tmp / "ledger.log"

    def reserve(epsilon: float) -> str:
        return call(sock, "reserve", {"project": "cardio", "dataset": "diabetes", "epsilon": epsilon, "delta": 1e-6})[
            "reservation"
        ]

    service = start_service_process(site, log_path=log)
    try:
        first = reserve(1.0)
        with trail_down(site):
            with pytest.raises(ChannelError, match="the budget was not reserved") as e:
                reserve(2.0)
            assert e.value.code == "unavailable"
            call(sock, "settle", {"reservation": first, "epsilon_spent": 0.5})
            os.kill(service.pid, signal.SIGKILL)
            service.wait(timeout=30)
            sock.unlink()
            with closing(Ledger(site)) as ledger:
                held = [(r["event"]["action"], r["event"]["details"].get("state")) for _, r in ledger.held.held()]
            assert held == [("ledger.reserve", None), ("ledger.settle", "released"), ("ledger.settle", None)]
            service = start_service_process(site, log_path=log)
            # the new service knows the records wait: still nothing is reserved
            with pytest.raises(ChannelError, match="the budget was not reserved") as e:
                reserve(0.1)
            assert e.value.code == "unavailable"
        third = reserve(0.25)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
    with closing(Ledger(site)) as ledger:
        released = next(r["id"] for r in ledger.runs("cardio") if r["id"] not in (first, third))
        assert ledger.held.held() == []
    got = [
        (r["action"], r["details"]["reservation"], r["details"].get("state"), "happened" in r["details"])
        for r in trail_records(site, "ledger.")
    ]
    assert got == [
        ("ledger.reserve", first, None, False),
        ("ledger.reserve", released, None, True),
        ("ledger.settle", released, "released", True),
        ("ledger.settle", first, None, True),
        ("ledger.reserve", third, None, False),
    ]


def test_a_jobs_reservation_made_unseen_lives_while_renewed_and_counts_in_full_once_not(service, site, state_dir):
    """The jobs service in a pid namespace the ledger does not see (its own container of the hub's pod) reserves
    as pid 0: the ledger cannot watch that process, so the reservation is held by lease. Renewed, it stays;
    once the runner stops renewing (killed mid-job), it counts in full; a kernel cannot renew it."""
    from paitient.channel import Peer
    from paitient.services.ledger.service import Leases

    register(state_dir, "alice", 65534, ("oncology",))
    now = [1000.0]
    service.leases = Leases(stale=60.0, clock=lambda: now[0])
    now[0] += 3600  # the ledger has run for an hour: its start gives a new reservation no time
    unseen = Peer(pid=0, uid=0, gid=0)
    args = {"project": "oncology", "dataset": "breast_cancer", "epsilon": 1.0, "delta": 1e-7, "user": "alice"}
    kept = service.reserve_job(unseen, {**args, "job_id": "kept"}, [])["reservation"]
    dropped = service.reserve_job(unseen, {**args, "job_id": "dropped"}, [])["reservation"]
    service.sweep()  # before the runner's first renewal: both alive, the making counts as one
    assert service.ledger.run(kept)["state"] == service.ledger.run(dropped)["state"] == "reserved"
    for _ in range(3):  # three minutes of a job whose runner renews every 10 s
        now[0] += 50
        assert service.renew_job(unseen, {"reservation": kept}, []) == {"reservation": kept, "state": "reserved"}
        service.sweep()
    assert service.ledger.run(kept)["state"] == "reserved"
    assert service.ledger.run(dropped)["state"] == "lost"  # not renewed for more than a minute: in full
    with pytest.raises(ChannelError) as e:
        service.renew_job(unseen, {"reservation": dropped}, [])
    assert e.value.code == "not_open"
    with pytest.raises(ChannelError) as e:  # a kernel keeps no job alive
        service.renew_job(Peer(pid=4242, uid=65534, gid=65534), {"reservation": kept}, [])
    assert e.value.code == "forbidden"
    register(state_dir, "bob", 65533, ("oncology",))
    kernel = Peer(pid=os.getpid(), uid=65533, gid=65533)  # a kernel's own reservation: not a job's
    kernels = service.reserve(kernel, {k: args[k] for k in args if k != "user"}, [])
    with pytest.raises(ChannelError) as e:
        service.renew_job(unseen, {"reservation": kernels["reservation"]}, [])
    assert e.value.code == "bad_request"
    settled = service.settle_job(unseen, {"reservation": kept, "epsilon_spent": 0.9, "record": {}}, [])
    assert settled["epsilon_spent"] == 0.9 and service.ledger.run(kept)["state"] == "settled"
    assert not service.leases.held()  # settled and lost alike: the ledger holds no lease for them
