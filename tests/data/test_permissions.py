"""As an ordinary user: published data is readable and loadable, and nothing of it (or the key) can be changed."""

import subprocess
import sys
import textwrap

import pytest

from paitient.config import load
from paitient.services.data import ingest as ing
from paitient.services.data import keys

from .conftest import COLUMNS, HEADER, PATIENTS, make_spec, write_csv

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def published(world_tmp):
    site = load(None, overrides={"workspace": {"state_dir": str(world_tmp / "state"), "min_k": 2}})
    keys.ensure_key(site)
    src = write_csv(world_tmp / "patients.csv", HEADER, PATIENTS)
    pub = ing.ingest(site, make_spec(src, COLUMNS, patient_id="mrn"), operator="t")
    return site, pub


def as_nobody(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*NOBODY, sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def test_an_ordinary_user_can_load_the_current_version(published):
    site, _ = published
    r = as_nobody(
        """
        from paitient import data
        df = data.load("breast_cancer")
        print(len(df), df["patient"].str.startswith("P-").all())
    """,
        PAITIENT_DATA_DIR=str(site.data_root),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["6", "True"]


def test_an_ordinary_user_cannot_change_publish_or_switch_anything(published):
    site, pub = published
    ds = pub.path.parent.parent
    r = as_nobody(f"""
        import os
        attempts = {{
            "append to data": lambda: open({str(pub.path / "data.parquet")!r}, "ab"),
            "rename manifest": lambda: os.rename({str(pub.path / "manifest.json")!r}, {str(pub.path / "m.json")!r}),
            "add a file to the version": lambda: open({str(pub.path / "extra")!r}, "w"),
            "add a version": lambda: os.mkdir({str(ds / "versions" / "2")!r}),
            "switch current": lambda: os.symlink("/etc", {str(ds / "current.new")!r}),
            "remove current": lambda: os.unlink({str(ds / "current")!r}),
            "new dataset": lambda: os.mkdir({str(site.data_root / "oncology" / "gbsg2")!r}),
            "read the key": lambda: open({str(site.key_file)!r}, "rb").read(),
        }}
        for name, attempt in attempts.items():
            try:
                attempt()
                print(name, "SUCCEEDED")
            except PermissionError:
                print(name, "denied")
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 8 and all(line.endswith(" denied") for line in lines), r.stdout
