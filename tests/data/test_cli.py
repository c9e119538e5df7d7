"""`paitient ingest` and `paitient datasets` as an operator runs them: exit codes, messages, no tracebacks."""

import json
import stat
import subprocess
import sys

import pytest

from .conftest import HEADER, PATIENTS, write_csv

SPEC = """
project = "oncology"
dataset = "breast_cancer"
source = "patients.csv"
patient_id = "mrn"
quasi_identifiers = ["age"]
description = "test extract"

[columns]
mrn = {{ action = "pseudonym", rename = "patient" }}
name = "drop"
email = "drop"
diagnosed = "date_shift"
age = {{ action = "generalise", method = "age_band", width = {width} }}
postcode = {{ action = "generalise", method = "prefix", length = 1 }}
score = "keep"
"""


def paitient(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "paitient.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


SITE = """
[workspace]
state_dir = "{state}"
min_k = 2

[[projects]]
name = "oncology"
group = "cn=oncology,ou=groups,dc=hospital,dc=example"
datasets = ["breast_cancer"]
"""


@pytest.fixture
def work(tmp_path):
    write_csv(tmp_path / "patients.csv", HEADER, PATIENTS)
    (tmp_path / "site.toml").write_text(SITE.format(state=tmp_path / "state"))
    (tmp_path / "spec.toml").write_text(SPEC.format(width=50))
    (tmp_path / "narrow.toml").write_text(SPEC.format(width=2))
    return tmp_path


def test_init_key_ingest_and_list(work):
    state = f"--site={work / 'site.toml'}"
    r = paitient("ingest", state, str(work / "spec.toml"))
    assert r.returncode == 1 and "no pseudonymisation key" in r.stderr and "--init-key" in r.stderr
    assert "Traceback" not in r.stderr
    r = paitient("ingest", state, "--init-key")
    assert r.returncode == 0 and "pseudonymisation key ready" in r.stdout
    key = work / "state" / "keys" / "pseudonym.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    r = paitient("ingest", state, "--dry-run", str(work / "spec.toml"))
    assert r.returncode == 0 and "dry run, nothing published" in r.stdout and "6 rows" in r.stdout
    assert not (work / "state" / "data").exists()
    r = paitient("ingest", state, str(work / "spec.toml"), env={"SUDO_USER": "olga", "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr
    assert "published oncology/breast_cancer version 1: 6 rows, 5 columns, k = 2 (patients)" in r.stdout
    r = paitient("datasets", state)
    assert r.returncode == 0
    header, row = r.stdout.splitlines()
    assert header.split() == ["project", "dataset", "version", "of", "rows", "cols", "k", "created", "operator"]
    assert row.split()[:7] == ["oncology", "breast_cancer", "1", "1", "6", "5", "2"] and row.split()[-1] == "olga"
    (listed,) = json.loads(paitient("datasets", state, "--json").stdout)
    assert listed["description"] == "test extract" and listed["versions"] == [1] and listed["operator"] == "olga"


def test_refusal_exits_1_with_the_reason_and_publishes_nothing(work):
    state = f"--site={work / 'site.toml'}"
    assert paitient("ingest", state, "--init-key").returncode == 0
    r = paitient("ingest", state, str(work / "narrow.toml"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("paitient ingest: ingest refused, nothing published: k-anonymity 1 is below")
    assert "no datasets published" in paitient("datasets", state).stdout
    r = paitient("ingest", state)
    assert r.returncode == 2 and "name an ingest spec" in r.stderr
