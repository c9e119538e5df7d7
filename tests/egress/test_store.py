"""Where indexes and their key live: root-only, built at publication, all or nothing, and rebuilt on demand."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from paitient.config import load
from paitient.services.data import ingest as ing
from paitient.services.data import keys, rowindex
from paitient.services.data.errors import IngestRefused
from paitient.services.data.publish import current_version, dataset_dir, versions
from tests.data.conftest import COLUMNS, HEADER, PATIENTS, make_spec, write_csv

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_index_and_key_are_root_only(demo):
    site = demo.site
    key = rowindex.key_path(site)
    assert os.stat(key).st_uid == 0 and mode(key) == 0o600 and mode(key.parent) == 0o700
    root = rowindex.index_root(site)
    folders = [root.parent, root, *(p for p in root.rglob("*") if p.is_dir())]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) == 9  # three versions, three files each
    assert all(mode(d) == 0o700 and os.stat(d).st_uid == 0 for d in folders)
    assert all(mode(f) == 0o600 and os.stat(f).st_uid == 0 for f in files)


def test_an_unrelated_account_reads_neither_the_published_data_nor_the_index_nor_the_key(demo):
    site = demo.site
    folder = rowindex.index_dir(site, "oncology", "breast_cancer", 1)
    manifest = site.data_root / "oncology" / "breast_cancer" / "current" / "manifest.json"
    code = f"""
        import os
        out = []
        for attempt in (
            lambda: open({str(manifest)!r}).read(1),
            lambda: open({str(folder / "entries.npy")!r}, "rb").read(1),
            lambda: open({str(folder / "header.json")!r}).read(1),
            lambda: os.listdir({str(rowindex.index_root(site))!r}),
            lambda: os.listdir({str(site.state_dir / "egress")!r}),
            lambda: open({str(rowindex.key_path(site))!r}, "rb").read(1),
            lambda: os.listdir({str(rowindex.key_path(site).parent)!r}),
        ):
            try:
                attempt()
                out.append("READ")
            except PermissionError:
                out.append("denied")
        print(out)
    """
    r = subprocess.run(
        [*NOBODY, sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(["denied"] * 7)


@pytest.fixture
def site(tmp_path):
    s = load(None, overrides={"workspace": {"state_dir": str(tmp_path / "state"), "min_k": 2}})
    keys.ensure_key(s)
    return s


@pytest.fixture
def spec(tmp_path):
    return make_spec(write_csv(tmp_path / "patients.csv", HEADER, PATIENTS), COLUMNS, patient_id="mrn")


def test_ingest_places_the_index_before_the_version_becomes_current(site, spec):
    first = ing.ingest(site, spec, operator="t")
    folder = rowindex.index_dir(site, "oncology", "breast_cancer", first.version)
    index = rowindex.load(folder, rowindex.load_key(site))
    assert index.rows == 6 and index.header["primary"] == ["patient"]
    frame = ing.ingest(site, spec, operator="t")  # a second version gets its own
    assert rowindex.load(rowindex.index_dir(site, "oncology", "breast_cancer", frame.version), rowindex.load_key(site))


def test_ingest_publishes_nothing_when_the_index_cannot_be_saved(site, spec):
    ing.ingest(site, spec, operator="t")
    ds = dataset_dir(site.data_root, "oncology", "breast_cancer")
    # a file where the dataset's index folder must go: saving fails for real
    blocker = rowindex.index_root(site) / "oncology" / "breast_cancer"
    os.rename(blocker, blocker.with_name("moved"))
    blocker.write_text("in the way")
    with pytest.raises(OSError):
        ing.ingest(site, spec, operator="t")
    assert versions(ds) == [1] and current_version(ds) == 1
    assert not [p for p in ds.iterdir() if p.name.startswith(".")]
    assert blocker.read_text() == "in the way"


def test_ingest_refuses_with_what_to_do_when_the_key_is_not_safe(site, spec):
    ing.ingest(site, spec, operator="t")  # creates the row-detection key
    key = rowindex.key_path(site)
    os.chmod(key, 0o644)
    with pytest.raises(IngestRefused, match="row-detection key refused.*chmod 600"):
        ing.ingest(site, spec, operator="t")
    ds = dataset_dir(site.data_root, "oncology", "breast_cancer")
    assert versions(ds) == [1]


def paitient(*args):
    return subprocess.run([sys.executable, "-m", "paitient.cli", *args], capture_output=True, text=True, timeout=300)


def test_reindex_builds_what_is_missing_or_stale_and_only_that(site, spec):
    ing.ingest(site, spec, operator="t")
    ing.ingest(site, spec, operator="t")
    key = rowindex.load_key(site)
    v1 = rowindex.index_dir(site, "oncology", "breast_cancer", 1)
    before = rowindex.load(v1, key, mmap=False).entries.copy()
    rowindex.remove(v1)  # as if version 1 was published before row detection existed
    state = ["--state-dir", str(site.state_dir)]

    r = paitient("datasets", "--reindex", *state)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("indexed oncology/breast_cancer") == 1 and "version 1:" in r.stdout
    assert np.array_equal(rowindex.load(v1, key).entries, before)

    r = paitient("datasets", "--reindex", *state)
    assert r.returncode == 0 and "nothing to do" in r.stdout

    r = paitient("datasets", "--reindex-all", *state)
    assert r.returncode == 0 and r.stdout.count("indexed oncology/breast_cancer") == 2

    # a new key makes every index stale: --reindex rebuilds them with it
    rowindex.key_path(site).unlink()
    r = paitient("datasets", "--reindex", *state)
    assert r.returncode == 0 and r.stdout.count("indexed") == 2
    new_key = rowindex.load_key(site)
    assert new_key != key and not np.array_equal(rowindex.load(v1, new_key).entries, before)


def test_reindex_names_an_unknown_project(site, spec):
    ing.ingest(site, spec, operator="t")
    r = paitient("datasets", "--reindex", "--project", "nosuch", "--state-dir", str(site.state_dir))
    assert r.returncode == 1
    assert "no published datasets of project 'nosuch'" in r.stderr and "Traceback" not in r.stderr
