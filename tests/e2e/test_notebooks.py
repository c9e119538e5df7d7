"""The researcher examples (``notebooks/``, shipped as ``paitient/examples``, put into every home at the first
server start) run cell by cell in the real workspace, as alice, from her home, and leave what they promise: a
figure in her home, a settled private training run charged to oncology, a table request that passed its
automatic checks, the kernel's own weights refused, and a certified job's weights that a steward approves and
alice verifies offline after downloading them."""

from __future__ import annotations

import hashlib
import html
import pwd
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest

from paitient.config import load as load_site
from paitient.services.airlock.store import Store
from paitient.services.ledger.store import Ledger
from tests.e2e.workspace import Workspace
from tests.kernelclient import CellResult

pytestmark = pytest.mark.e2e

NOTEBOOKS = Path(__file__).resolve().parents[2] / "extensions" / "paitient" / "examples"
NAMES = (
    "01-explore-data.ipynb",
    "02-train-with-differential-privacy.ipynb",
    "03-request-export.ipynb",
    "04-certified-training.ipynb",
)


def open_from_home(ws: Workspace, s, user: str, name: str) -> list[str]:
    """The notebook as JupyterLab opens it from the user's home (where the spawner put it): the code cells
    the researcher would run."""
    r = ws.api(s, user, "GET", f"contents/{name}?content=1")
    assert r.status_code == 200 and r.json()["type"] == "notebook", r.text[:500]
    return ["".join(c["source"]) for c in r.json()["content"]["cells"] if c["cell_type"] == "code"]


def run_notebook(ws: Workspace, s, user: str, name: str) -> list[CellResult]:
    """Every code cell in order on one fresh kernel, as JupyterLab's "Run All" does; stop at the first error."""
    cells = open_from_home(ws, s, user, name)
    expected = [c.source for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells if c.cell_type == "code"]
    assert cells == expected
    kernel = ws.start_kernel(s, user)
    results = []
    for i, code in enumerate(cells):
        result = ws.run_cell(s, user, code, kernel_id=kernel, timeout=600)
        assert result.error is None, f"{name}, code cell {i + 1} failed: {result.error}\n{result.stderr}\n{code}"
        results.append(result)
    assert ws.api(s, user, "DELETE", f"kernels/{kernel}").status_code == 204
    return results


@dataclass
class Ran:
    home: Path
    uid: int
    started: float
    runs_before: list[dict]
    budget_before: dict
    cells: dict[str, list[CellResult]] = field(default_factory=dict)


def breast_cancer_budget(ledger: Ledger) -> dict:
    return next(b for b in ledger.budget("oncology") if b["dataset"] == "breast_cancer")


@pytest.fixture(scope="module")
def ran(workspace) -> Ran:
    """alice signs in and runs the three notebooks in order, each on its own kernel."""
    alice = workspace.login("alice")
    workspace.start_server(alice, "alice")
    member = workspace.member("alice")
    ledger = Ledger(load_site(str(workspace.site_file)))
    out = Ran(
        home=Path(pwd.getpwnam(member.account).pw_dir),
        uid=member.uid,
        started=time.time(),
        runs_before=ledger.runs("oncology", "breast_cancer"),
        budget_before=breast_cancer_budget(ledger),
    )
    for name in NAMES:
        out.cells[name] = run_notebook(workspace, alice, "alice", name)
    return out


def outputs_of(result: CellResult, mime: str) -> list:
    return [
        o["content"]["data"][mime]
        for o in result.outputs
        if o["msg_type"] in ("display_data", "execute_result") and mime in o["content"].get("data", {})
    ]


def test_notebooks_are_nbformat_4_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == list(NAMES)
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=nbformat.NO_CONVERT)
        nbformat.validate(notebook)
        assert notebook.nbformat == 4
        assert notebook.metadata.kernelspec.name == "python3"
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert code and all(c.outputs == [] and c.execution_count is None for c in code), name
        assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")


def test_explore_saves_a_figure_in_the_home(ran):
    cells = ran.cells["01-explore-data.ipynb"]
    assert outputs_of(cells[0], "application/vnd.jupyter.widget-view+json"), "the catalogue is a widget"
    assert cells[1].stdout.strip() == "(569, 35)"
    assert "mean radius" in cells[2].result and "All" in cells[3].result
    for name in NAMES:  # the notebooks are in the home, alice's own files
        assert (ran.home / name).stat().st_uid == ran.uid
    figure = ran.home / "figures" / "radius_by_diagnosis.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    assert figure.stat().st_uid == ran.uid  # written by alice's own account, in her home
    assert figure.stat().st_mtime >= ran.started - 1
    assert outputs_of(cells[-1], "image/png"), "the figure is shown in the notebook too"


def test_private_training_is_charged_to_the_project_and_the_weights_match_its_record(ran, workspace):
    cells = ran.cells["02-train-with-differential-privacy.ipynb"]
    ledger = Ledger(load_site(str(workspace.site_file)))
    before = {r["id"] for r in ran.runs_before}
    everything = [r for r in ledger.runs("oncology", "breast_cancer") if r["id"] not in before]
    new = [r for r in everything if r["username"] == "alice" and not r["run_id"].startswith("job:")]
    assert len(new) == 1, new  # notebook 4's job is the other new run
    run = new[0]
    assert run["state"] == "settled" and run["epsilon"] == 1.0 and 0.5 < run["epsilon_spent"] <= 1.0
    weights = ran.home / "breast_cancer_dp.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == run["weights_sha256"]
    assert cells[-1].stdout.split()[-1] == run["weights_sha256"]
    after = breast_cancer_budget(ledger)
    spent = sum(r["epsilon_spent"] for r in everything)
    assert after["epsilon_spent"] == pytest.approx(ran.budget_before["epsilon_spent"] + spent)
    assert after["epsilon_reserved"] == 0
    accuracy = next(float(c.stdout.split()[-1]) for c in cells if "accuracy on the held-out rows" in c.stdout)
    assert accuracy > 0.85


def test_export_leaves_a_table_in_review_and_the_kernels_weights_are_refused(ran, workspace):
    cells = ran.cells["03-request-export.ipynb"]
    (table_id,) = (c.result.strip("'") for c in cells if c.result and c.result.startswith("'2"))
    site = load_site(str(workspace.site_file))
    store = Store.for_site(site)
    table = store.get(table_id)
    assert (table.username, table.kind, table.filename) == ("alice", "table", "radius_by_age.csv")
    assert table.project == "oncology" and table.state == "in_review" and table.created >= ran.started
    assert table.sha256 == hashlib.sha256((ran.home / "radius_by_age.csv").read_bytes()).hexdigest()
    table_checks = {c["check"]: c["status"] for c in store.checks(table_id)}
    assert table_checks["recipe"] == "pass" and set(table_checks.values()) == {"pass"}, table_checks
    # The demo's oncology keeps the default policy: weights trained in the kernel are refused at once.
    refusal = next(c.stdout for c in cells if "does not release self-reported weights" in c.stdout)
    assert refusal.startswith("project oncology does not release self-reported weights") and "paitient.jobs" in refusal
    assert [r.id for r in store.list(username="alice") if r.created >= ran.started and r.kind == "weights"] == [
        r.id for r in store.list(username="alice") if r.created >= ran.started and r.meta.get("job")
    ]
    report = cells[-1].stdout
    assert f"{table_id} (table): in_review, automatic checks: pass" in report


def test_certified_training_leaves_a_settled_job_and_a_request_the_runner_vouches_for(ran, workspace):
    cells = ran.cells["04-certified-training.ipynb"]
    site = load_site(str(workspace.site_file))
    request_id = next(c.result.strip("'") for c in cells if c.result and c.result.startswith("'2"))
    req = Store.for_site(site).get(request_id)
    assert (req.username, req.kind, req.project) == ("alice", "weights", "oncology") and req.meta.get("job")
    checks = {c["check"]: c["status"] for c in Store.for_site(site).checks(request_id)}
    assert checks["certified"] == "pass" and checks["training_record"] == "pass", checks
    job_run = [r for r in Ledger(site).runs("oncology", "breast_cancer") if r["run_id"] == f"job:{req.meta['job']}"]
    assert len(job_run) == 1 and job_run[0]["state"] == "settled" and job_run[0]["weights_sha256"] == req.sha256
    assert 0.9 < job_run[0]["epsilon_spent"] <= 1.0 and job_run[0]["username"] == "alice"
    shown = "".join(c.stdout for c in cells)
    assert "epsilon spent: " in shown and "accuracy on the runner's held-out rows: " in shown
    assert "certified: pass - signed by the training runner" in shown


def _airlock_page(workspace: Workspace, s, path: str):
    """A page of the airlock through the proxy, as a browser gets it (the first visit runs the hub's OAuth)."""
    deadline = time.monotonic() + 60
    while (r := s.get(workspace.url + "services/airlock/" + path, timeout=30)).status_code == 404:
        if time.monotonic() > deadline or "services/airlock" not in r.url:
            break
        time.sleep(0.5)  # the hub adds the service's route once the service answers
    return r


def test_a_steward_sees_what_the_runner_certified_approves_and_alice_verifies_her_download(ran, workspace, tmp_path):
    cells = ran.cells["04-certified-training.ipynb"]
    request_id = next(c.result.strip("'") for c in cells if c.result and c.result.startswith("'2"))
    site = load_site(str(workspace.site_file))
    req = Store.for_site(site).get(request_id)
    sam = workspace.login("sam")
    page = _airlock_page(workspace, sam, f"requests/{request_id}")
    text = html.unescape(page.text.replace("\n", ""))
    assert page.status_code == 200 and 'id="certified-facts"' in text and 'id="self-reported"' not in text
    record = req.meta["record"]["record"]
    for fact in (
        f"<th>Training job</th><td>{req.meta['job']}</td>",
        f"<td>{record['weights_sha256']}</td>",
        f"<th>Epsilon spent (the runner's accountant)</th><td>{record['epsilon']}</td>",
        f"<td>{record['graph_sha256']}</td>",
        'id="approvals-needed">1<',
        # the graph the runner trained, which the researcher chose: no number in it steers the weights
        "p0 = parameter 0.weight [16, 30]",
        'id="graph-numbers">Numbers the operations compute with (0):none</p>',
        "Parameter names (4, 28 characters)",
    ):
        assert fact in text, fact
    token = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
    r = sam.post(
        workspace.url + f"services/airlock/requests/{request_id}/decision",
        timeout=30,
        data={"action": "approve", "comment": "certified by the runner, audit within bounds", "_xsrf": token},
    )
    assert r.status_code == 200 and 'id="state">released<' in r.text.replace("\n", "")

    alice = workspace.login("alice")
    mine = _airlock_page(workspace, alice, f"requests/{request_id}")
    assert mine.status_code == 200 and 'id="graph"' not in mine.text and "p0 = parameter" not in mine.text
    files = {}
    for part, name in (("download", "weights.safetensors"), ("record", "record.json")):
        got = _airlock_page(workspace, alice, f"requests/{request_id}/{part}")
        assert got.status_code == 200, (part, got.text[:300])
        files[name] = tmp_path / name
        files[name].write_bytes(got.content)
    assert hashlib.sha256(files["weights.safetensors"].read_bytes()).hexdigest() == req.sha256
    key = _airlock_page(workspace, alice, "jobs-signing.pub")
    assert key.status_code == 200
    (tmp_path / "jobs-signing.pub").write_bytes(key.content)

    # Offline, away from the workspace: the record, the weights and the published key are all it takes.
    def verify():
        return subprocess.run(
            [sys.executable, "-m", "paitient.cli", "jobs", "verify", f"--record={files['record.json']}",
             f"--weights={files['weights.safetensors']}", f"--public-key={tmp_path / 'jobs-signing.pub'}"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip

    verified = verify()
    assert verified.returncode == 0 and req.meta["job"] in verified.stdout, verified.stdout + verified.stderr
    # A weights file changed by one byte no longer verifies.
    forged = bytearray(files["weights.safetensors"].read_bytes())
    forged[-1] ^= 1
    files["weights.safetensors"].write_bytes(bytes(forged))
    refused = verify()
    assert refused.returncode != 0 and "not the weights the runner trained" in refused.stdout + refused.stderr
