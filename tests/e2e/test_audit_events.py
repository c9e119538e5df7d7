"""Each audit event appears after the real action that causes it, in the running workspace.

Every test marks where the trail ends, does the thing a researcher or steward does (sign in, start a server,
run a cell, train privately, ask the airlock), and then finds the matching record after the mark with the
right actor, action, object, outcome and details. The last test checks the whole resulting trail with
``paitient audit verify``.
"""

from __future__ import annotations

import json
import pwd
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from paitient.config import load as load_site
from paitient.services.audit import config_details
from paitient.services.audit.query import Filter, newest_first, select
from tests.e2e.workspace import PAITIENT, Workspace

pytestmark = pytest.mark.e2e

Record = dict[str, Any]


# -- reading the trail ------------------------------------------------------------------------------------


def last_seq(ws: Workspace) -> int:
    return next(newest_first(ws.state_dir / "audit"))["seq"]


def records_after(ws: Workspace, seq: int) -> list[Record]:
    """Records written after ``seq``, oldest first."""
    out = []
    for rec in newest_first(ws.state_dir / "audit"):
        if rec["seq"] <= seq:
            break
        out.append(rec)
    return out[::-1]


def wait_for(ws: Workspace, seq: int, pred: Callable[[Record], bool], timeout: float = 30.0) -> Record:
    """The first record after ``seq`` that satisfies ``pred``; some events are written a moment after the
    action returns (the server sends a cell's record off its event loop)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in records_after(ws, seq) if pred(r)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            seen = [(r["seq"], r["actor"], r["action"], r["object"], r["outcome"]) for r in records_after(ws, seq)]
            raise AssertionError(f"no matching record after seq {seq}; written since: {seen}")
        time.sleep(0.2)


def event(
    action: str, actor: str | None = None, obj: str | None = None, outcome: str = "ok", **details: Any
) -> Callable[[Record], bool]:
    def pred(r: Record) -> bool:
        return (
            r["action"] == action
            and r["outcome"] == outcome
            and (actor is None or r["actor"] == actor)
            and (obj is None or r["object"] == obj)
            and all(r["details"].get(k) == v for k, v in details.items())
        )

    return pred


def cell_json(ws: Workspace, s, user: str, code: str, kernel: str) -> Any:
    out = ws.run_cell(s, user, code, kernel_id=kernel)
    assert out.error is None, (out.error, out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def signed_in(ws: Workspace, user: str):
    s = ws.login(user)
    ws.start_server(s, user)
    return s


# -- at start ---------------------------------------------------------------------------------------------


def test_start_records_the_effective_configuration_and_the_demo_publications(workspace):
    site = load_site(str(workspace.site_file))
    records = list(newest_first(workspace.state_dir / "audit"))[::-1]
    config = next(r for r in records if r["action"] == "config.effective")
    assert config["actor"] == "system" and config["outcome"] == "ok"
    assert config["object"] == str(workspace.site_file) == config["details"]["source"]
    assert config["details"]["sha256"] == config_details(site)["sha256"]
    assert config["details"]["config"]["workspace"]["state_dir"] == str(workspace.state_dir)
    assert [p["name"] for p in config["details"]["config"]["projects"]] == ["oncology", "cardiometabolic"]

    published = {r["object"]: r for r in records if r["action"] == "ingest.publish"}
    for project, dataset in (("oncology", "breast_cancer"), ("oncology", "gbsg2"), ("cardiometabolic", "diabetes")):
        manifest = json.loads((site.data_root / project / dataset / "current" / "manifest.json").read_text())
        rec = published[f"{project}/{dataset}@v{manifest['version']}"]
        assert rec["outcome"] == "ok"
        d = rec["details"]
        assert (d["project"], d["dataset"], d["version"]) == (project, dataset, manifest["version"])
        assert (d["rows"], d["k"], d["key_id"]) == (manifest["rows"], manifest["k"], manifest["key_id"])
        assert rec["seq"] < config["seq"]  # published before the hub let anyone in


# -- people -----------------------------------------------------------------------------------------------


def test_sign_in_and_each_refusal_with_its_reason(workspace):
    mark = last_seq(workspace)
    wrong = "wrong-" + uuid.uuid4().hex
    workspace.login("alice")
    for user, password in (("alice", wrong), ("dave", None), ("nobody-here", wrong)):
        with pytest.raises(PermissionError):
            workspace.login(user, password)
    ok = wait_for(workspace, mark, event("auth.login", "alice"))
    assert ok["details"]["projects"] == ["oncology"] and "researcher" in ok["details"]["roles"]
    denied = [r for r in records_after(workspace, mark) if r["action"] == "auth.login" and r["outcome"] == "denied"]
    assert [(r["actor"], r["details"]["reason"]) for r in denied] == [
        ("alice", "wrong password or unknown user"),
        ("dave", "not a member of any project"),
        ("nobody-here", "wrong password or unknown user"),
    ]
    # the refused password itself is nowhere in the trail
    assert wrong not in json.dumps(records_after(workspace, mark))


def test_server_kernel_and_cell_events_with_datasets_and_exact_code(workspace):
    """carol (both projects): spawn, kernel start, a cell, kernel stop, server stop - all as she does them."""
    mark = last_seq(workspace)
    carol = signed_in(workspace, "carol")
    spawn = wait_for(workspace, mark, event("server.spawn", "carol"))
    member = workspace.member("carol")
    assert spawn["object"] == member.account
    assert spawn["details"]["uid"] == member.uid
    assert spawn["details"]["projects"] == ["cardiometabolic", "oncology"]

    kernel = workspace.start_kernel(carol, "carol")
    started = wait_for(workspace, mark, event("kernel.start", "carol", kernel))
    datasets = ["cardiometabolic/diabetes", "oncology/breast_cancer", "oncology/gbsg2"]
    assert started["details"]["datasets"] == datasets
    # reported by carol's server (host pid namespace), under carol's uid; the kernel's pid is named
    assert started["details"]["peer"]["uid"] == member.uid and started["details"]["peer"]["origin"] == "host"

    marker = uuid.uuid4().hex
    code = (
        f"# cohort check {marker}\nfrom paitient import data\n"
        "df = data.load('diabetes')\nprint(len(df), 'Zürich ✓')\t# tab, umlaut, tick\n"
    )
    out = workspace.run_cell(carol, "carol", code, kernel_id=kernel)
    assert out.error is None and out.stdout.split()[0] == "442", out
    cell = wait_for(workspace, mark, event("cell.execute", "carol", kernel))
    assert cell["details"]["code"] == code and cell["details"]["truncated"] is False
    # captured by the server on the way to the kernel, not reported by the kernel
    assert cell["details"]["peer"] == {**cell["details"]["peer"], "uid": member.uid, "origin": "host"}

    assert workspace.api(carol, "carol", "DELETE", f"kernels/{kernel}").status_code == 204
    stopped = wait_for(workspace, mark, event("kernel.stop", "carol", kernel))
    assert stopped["details"]["datasets"] == datasets and stopped["seq"] > cell["seq"]

    # carol stops her server from the hub's control panel (its API with her own session and XSRF token)
    r = carol.delete(
        workspace.url + "hub/api/users/carol/server",
        timeout=60,
        headers={"X-XSRFToken": carol.cookies.get("_xsrf", path="/hub/")},
    )
    assert r.status_code in (202, 204), r.text
    down = wait_for(workspace, mark, event("server.stop", "carol", member.account))
    assert down["details"]["pid"] == spawn["details"]["pid"] and down["seq"] > stopped["seq"]


# -- privacy ledger ---------------------------------------------------------------------------------------

TRAIN = """
import json, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from paitient import data, dp
df = data.load("breast_cancer")
x = df.select_dtypes("float64").to_numpy(dtype="float32")
x = (x - x.mean(0)) / x.std(0)
ds = TensorDataset(torch.tensor(x), torch.tensor(df["target"].to_numpy()))
model = nn.Linear(x.shape[1], 2)
run = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(ds, batch_size=64),
                      target_epsilon=0.5, epochs=2, max_grad_norm=1.0, project="oncology",
                      dataset="breast_cancer", criterion=nn.CrossEntropyLoss(), progress=False)
for epoch in range(run.epochs):
    for xb, yb in run.data_loader:
        run.optimizer.zero_grad()
        run.criterion(run.model(xb), yb).backward()
        run.optimizer.step()
try:
    greedy = nn.Linear(x.shape[1], 2)
    dp.make_private(greedy, torch.optim.SGD(greedy.parameters(), lr=0.5), DataLoader(ds, batch_size=64),
                    target_epsilon=20.0,
                    epochs=1, max_grad_norm=1.0, project="oncology", dataset="breast_cancer", progress=False)
    refused = ""
except dp.BudgetExceeded as e:
    refused = str(e)
print(json.dumps({"reservation": run.reservation, "spent": run.record["epsilon_spent"],
                  "delta": run.record["delta_spent"], "weights": run.record["weights_sha256"],
                  "refused": refused}))
"""


def test_private_training_reserves_and_settles_in_the_ledger(workspace):
    alice = signed_in(workspace, "alice")
    kernel = workspace.start_kernel(alice, "alice")
    mark = last_seq(workspace)
    got = cell_json(workspace, alice, "alice", TRAIN, kernel)
    assert got["refused"] and 0 < got["spent"] <= 0.5

    reserve = wait_for(workspace, mark, event("ledger.reserve", "alice", "oncology/breast_cancer"))
    assert reserve["details"]["reservation"] == got["reservation"]
    assert reserve["details"]["epsilon"] == 0.5 and reserve["details"]["project"] == "oncology"
    settle = wait_for(workspace, mark, event("ledger.settle", "alice", "oncology/breast_cancer"))
    assert settle["details"]["reservation"] == got["reservation"] and settle["seq"] > reserve["seq"]
    assert settle["details"]["epsilon_spent"] == got["spent"]
    assert settle["details"]["delta_spent"] == got["delta"]
    assert settle["details"]["weights_sha256"] == got["weights"]
    # a training run the budget cannot cover is refused before a step, and the refusal is recorded
    refused = wait_for(
        workspace, mark, event("ledger.reserve", "alice", "oncology/breast_cancer", "denied", epsilon=20.0)
    )
    assert refused["details"]["reason"] == got["refused"] and refused["seq"] > settle["seq"]
    # the training cell itself is in the trail too, with its code
    cell = wait_for(workspace, mark, event("cell.execute", "alice", kernel))
    assert cell["details"]["code"] == TRAIN and cell["seq"] < reserve["seq"]


# -- airlock ----------------------------------------------------------------------------------------------

REQUEST = """
import hashlib, json, time, torch
from paitient import airlock, data
df = data.load("breast_cancer")
df.groupby("age")["mean radius"].mean().reset_index().to_csv("radius_by_age.csv", index=False)
torch.save({"w": torch.zeros(2)}, "model.pt")
rid = airlock.request("radius_by_age.csv", kind="table", justification="mean radius by age band",
                      recipe={"dataset": "breast_cancer", "index": ["age"], "values": "mean radius",
                              "aggfunc": "mean"})
try:
    airlock.request("model.pt", kind="weights", justification="a pickled model")
    refused = ""
except airlock.AirlockError as e:
    refused = str(e)
deadline = time.time() + 90
while time.time() < deadline and airlock.status(rid)["state"] in ("submitted", "checking"):
    time.sleep(0.2)
print(json.dumps({"id": rid, "state": airlock.status(rid)["state"], "refused": refused,
                  "sha256": hashlib.sha256(open("radius_by_age.csv", "rb").read()).hexdigest()}))
"""


def decide(ws: Workspace, s, rid: str, action: str, comment: str):
    """Open the request's page as the user's browser does, then post a decision with its XSRF token (the
    page's form token; a user without the form sends the cookie's value, as a hand-made request would)."""
    page = s.get(ws.url + f"services/airlock/requests/{rid}", timeout=30)
    assert page.status_code == 200, page.text[-600:] + ws.logs()
    form = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
    token = form.group(1) if form else s.cookies.get("_xsrf", path="/services/airlock/")
    return s.post(
        ws.url + f"services/airlock/requests/{rid}/decision",
        timeout=30,
        data={"action": action, "comment": comment, "_xsrf": token},
    )


def test_airlock_request_check_decision_and_download(workspace):
    alice = signed_in(workspace, "alice")
    kernel = workspace.start_kernel(alice, "alice")
    mark = last_seq(workspace)
    got = cell_json(workspace, alice, "alice", REQUEST, kernel)
    rid = got["id"]
    # The demo's oncology takes no weights trained in the kernel (the default policy).
    assert got["state"] == "in_review" and "does not release self-reported weights" in got["refused"]

    req = wait_for(workspace, mark, event("airlock.request", "alice", rid))
    assert req["details"] == {
        **req["details"],
        "project": "oncology",
        "kind": "table",
        "filename": "radius_by_age.csv",
        "sha256": got["sha256"],
    }
    pickle = wait_for(workspace, mark, event("airlock.request", "alice", outcome="denied"))
    assert pickle["details"] == {
        **pickle["details"],
        "reason": got["refused"],
        "kind": "weights",
        "filename": "model.pt",
        "project": "oncology",
    }
    check = wait_for(workspace, mark, event("airlock.check", "airlock", rid))
    assert check["details"]["overall"] == "pass" and check["details"]["user"] == "alice"
    assert check["details"]["checks"]["recipe"] == "pass" and check["details"]["checks"]["minimum_count"] == "pass"

    # alice may not approve her own output: refused, and the refusal is recorded under her name
    assert decide(workspace, alice, rid, "approve", "looks fine to me").status_code == 403
    own = wait_for(workspace, mark, event("airlock.decision", "alice", rid, "denied"))
    assert own["details"]["action"] == "approve" and own["details"]["user"] == "alice" and own["details"]["reason"]

    sam = workspace.login("sam")
    assert decide(workspace, sam, rid, "approve", "means over >= 68 biopsies each").status_code == 200
    approved = wait_for(workspace, mark, event("airlock.decision", "sam", rid))
    assert approved["details"] == {
        **approved["details"],
        "action": "approve",
        "state": "released",
        "comment": "means over >= 68 biopsies each",
        "user": "alice",
        "project": "oncology",
    }
    # a second decision on a released request is refused and recorded as well
    assert decide(workspace, sam, rid, "reject", "changed my mind").status_code >= 400
    again = wait_for(workspace, mark, event("airlock.decision", "sam", rid, "denied"))
    assert again["details"]["action"] == "reject" and again["seq"] > approved["seq"]

    bob = workspace.login("bob")
    assert bob.get(workspace.url + f"services/airlock/requests/{rid}/download", timeout=30).status_code == 403
    r = alice.get(workspace.url + f"services/airlock/requests/{rid}/download", timeout=30)
    assert r.status_code == 200 and r.content.startswith(b"age,mean radius\n")
    download = wait_for(workspace, mark, event("airlock.download", "alice", rid))
    assert download["details"]["sha256"] == got["sha256"] and download["details"]["size"] == len(r.content)
    denied = wait_for(workspace, mark, event("airlock.download", "bob", rid, "denied"))
    assert "oncology" in denied["details"]["reason"]
    assert req["seq"] < check["seq"] < approved["seq"] < download["seq"]


# -- forgery ----------------------------------------------------------------------------------------------

FORGE = """
import json, os
from paitient.channel import ChannelError, call
sock = os.path.join(os.environ["PAITIENT_RUN_DIR"], "audit.sock")
out = {}
attempts = {
    "actor": {"action": "cell.execute", "object": "MARK", "actor": "bob", "details": {"code": "x"}},
    "details_user": {"action": "cell.execute", "object": "MARK", "details": {"user": "bob", "code": "x"}},
    "sign_in": {"action": "auth.login", "object": "MARK", "details": {"user": "bob"}},
    "decision": {"action": "airlock.decision", "object": "MARK", "details": {"action": "approve"}},
    "settle": {"action": "ledger.settle", "object": "MARK", "details": {"epsilon_spent": 0}},
    "own": {"action": "cell.execute", "object": "MARK", "details": {"code": "said by the kernel", "peer": {"uid": 0}}},
}
for name, args in attempts.items():
    try:
        out[name] = call(sock, "record", args)
    except ChannelError as e:
        out[name] = {"code": e.code, "error": str(e)}
trail = "STATE/audit/trail-000001.jsonl"
try:
    open(trail, "a").write("{}\\n")
    out["write"] = "written"
except OSError as e:
    out["write"] = type(e).__name__
print(json.dumps(out))
"""


def test_a_kernel_cannot_record_an_event_in_another_users_name(workspace):
    alice = signed_in(workspace, "alice")
    kernel = workspace.start_kernel(alice, "alice")
    marker = "forge-" + uuid.uuid4().hex
    mark = last_seq(workspace)
    got = cell_json(
        workspace, alice, "alice", FORGE.replace("MARK", marker).replace("STATE", str(workspace.state_dir)), kernel
    )
    assert got["actor"]["code"] == "bad_request" and "actor comes from your connection" in got["actor"]["error"]
    assert got["details_user"]["code"] == "bad_request" and "details.user" in got["details_user"]["error"]
    for name in ("sign_in", "decision", "settle"):
        assert got[name]["code"] == "forbidden", (name, got[name])
    assert got["write"] in ("PermissionError", "FileNotFoundError")
    # nor can alice's account append to the trail from outside the sandbox (her server runs as it)
    account = pwd.getpwnam(workspace.member("alice").account)
    trail = workspace.state_dir / "audit" / "trail-000001.jsonl"
    host = subprocess.run(
        [
            "setpriv",
            f"--reuid={account.pw_uid}",
            f"--regid={account.pw_gid}",
            "--clear-groups",
            "sh",
            "-c",
            f"echo '{{}}' >> {trail}",
        ],
        capture_output=True,
        text=True,
    )
    assert host.returncode != 0 and "Permission denied" in host.stderr

    # what was accepted is recorded under alice's own uid, marked as coming from inside a sandbox
    own = wait_for(workspace, mark, lambda r: r["object"] == marker)
    alice_uid = workspace.member("alice").uid
    assert own["actor"] == "alice" and own["action"] == "cell.execute" and own["seq"] == got["own"]["seq"]
    assert own["details"]["peer"]["uid"] == alice_uid and own["details"]["peer"]["origin"] == "namespaced"
    with_marker = [r for r in records_after(workspace, mark) if marker in json.dumps(r)]
    assert {r["action"] for r in with_marker} == {"cell.execute"}  # the cell's code, and the one own record
    assert {r["actor"] for r in with_marker} == {"alice"}
    assert not [
        r for r in select(workspace.state_dir / "audit", Filter(user="bob"), limit=10_000) if marker in json.dumps(r)
    ]


# -- the command line over the resulting trail ------------------------------------------------------------


def test_audit_show_finds_the_events_and_verify_passes(workspace):
    alice = signed_in(workspace, "alice")
    marker = uuid.uuid4().hex
    code = f"print('{marker}')"
    mark = last_seq(workspace)
    assert workspace.run_cell(alice, "alice", code).stdout.strip() == marker
    wait_for(workspace, mark, event("cell.execute", "alice", code=code))

    def show(*args: str) -> list[Record]:
        out = subprocess.run(
            [*PAITIENT, "audit", "show", "--json", *workspace.args(), *args], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]

    cells = show("--user=alice", "--action=cell.execute", "--since=10m", "--limit=0")
    assert code in [r["details"]["code"] for r in cells] and {r["actor"] for r in cells} == {"alice"}
    refusals = show("--action=auth", "--outcome=denied", "--limit=0")
    assert "dave" in {r["actor"] for r in refusals} and {r["outcome"] for r in refusals} == {"denied"}
    published = show("--project=oncology", "--action=ingest.publish", "--limit=0")
    assert {r["object"] for r in published} == {"oncology/breast_cancer@v1", "oncology/gbsg2@v1"}

    verify = subprocess.run(
        [*PAITIENT, "audit", "verify", *workspace.args()], capture_output=True, text=True, timeout=120
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("audit trail intact:")
    report = json.loads(
        subprocess.run(
            [*PAITIENT, "audit", "verify", "--json", *workspace.args()], capture_output=True, text=True, timeout=120
        ).stdout
    )
    assert report["ok"] and report["problems"] == [] and report["last_seq"] > mark
