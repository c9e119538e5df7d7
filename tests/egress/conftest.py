"""Fixtures for the row-detection tests: the demo datasets, published for real, and their saved indexes.

The demo data (``paitient.ops.demodata``) goes through the real ingest with real keys into a state
directory under a world-traversable /tmp folder (so that the permission tests show what the modes of
the index itself do), and the indexes are loaded back from disk as the egress service would.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from paitient.config import SiteConfig, load
from paitient.ops.demodata import DEMO, publish_demo
from paitient.rules.edm import EDMIndex, Scan
from paitient.services.data import keys, rowindex


@dataclass
class Demo:
    site: SiteConfig
    key: bytes
    indexes: dict[str, EDMIndex]
    frames: dict[str, pd.DataFrame]

    def revealed(self, text: str | bytes) -> dict[str, int]:
        """How many rows of each demo dataset ``text`` reveals."""
        scan = Scan(text)
        return {name: len(scan.rows(ix)) for name, ix in self.indexes.items()}

    def rows(self, text: str | bytes, dataset: str) -> np.ndarray:
        return Scan(text).rows(self.indexes[dataset])


@pytest.fixture(scope="session")
def demo() -> Demo:
    base = Path(tempfile.mkdtemp(prefix="paitient-edm-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        # an accounts prefix of its own: the projects' groups live for the whole session
        site = load(
            None,
            overrides={
                "workspace": {"state_dir": str(base / "state")},
                "accounts": {"prefix": "t" + secrets.token_hex(2)},
            },
        )
        # a fixed pseudonym key: published rows come in an order keyed by it (never the export's), and the
        # tests pick rows by position, so with a new key each session they would read other rows each time
        site.key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys.create_once(site.key_file, hashlib.sha256(b"paitient egress tests: demo pseudonym key").digest())
        publish_demo(site)
        os.chmod(site.state_dir, 0o755)
        key = rowindex.load_key(site)
        indexes, frames = {}, {}
        for project, dataset in DEMO:
            indexes[dataset] = rowindex.load(rowindex.index_dir(site, project, dataset, 1), key)
            frames[dataset] = pq.read_table(site.data_root / project / dataset / "current" / "data.parquet").to_pandas()
        yield Demo(site, key, indexes, frames)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def stored(service):
    """The service's store once every count it made is in it (the service writes them behind its answers)."""
    assert service.counts.flush(), "the egress service's counts were not stored within 30 s"
    return service.store
