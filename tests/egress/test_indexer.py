"""The egress service builds the row index of a published version it finds without one.

The state here is a folder of its own beside the demo's published data, as a Kubernetes hub pod's state
claim is beside the data volumes that ingest on a host wrote: no key and no index. Until the service has
built one, outputs of the dataset's projects are unchecked; once it has, their rows are found with it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from paitient.config import load
from paitient.registry import Member
from paitient.services.data import rowindex
from paitient.services.data.publish import DATA_FILE, dataset_dir
from paitient.services.egress.indexer import Built, Indexer, builder_command
from paitient.services.egress.matcher import Matcher, MissingIndex
from paitient.services.egress.service import Context, assemble
from paitient.services.egress.store import EgressStore
from tests.egress.test_service import CallerIsAlice
from tests.scrape import value

PROJECT, DATASET = "oncology", "breast_cancer"


def claim_site(demo, state: Path, data_root: Path | None = None):
    """A site whose state is ``state`` (empty) and whose data is the demo's (or ``data_root``)."""
    state.mkdir(mode=0o755)
    return load(
        None,
        overrides={
            "workspace": {"state_dir": str(state), "data_root": str(data_root or demo.site.data_root)},
            "accounts": {"prefix": demo.site.accounts.prefix},
        },
    )


def printed_rows(demo, first: int, n: int) -> bytes:
    """Rows of the demo's breast_cancer as a notebook prints a slice of its frame."""
    return demo.frames[DATASET].iloc[first : first + n].to_string().encode()


def test_a_version_without_an_index_here_is_indexed_by_the_service_and_its_rows_are_then_found(demo, tmp_path):
    site = claim_site(demo, tmp_path / "claim")
    built: list[Built] = []
    indexer = Indexer(site, logging.getLogger("test.indexer"), on_built=built.append)
    matcher = Matcher(site, on_missing=indexer.want)
    text = printed_rows(demo, 10, 5)
    try:
        # nothing here yet: the output cannot be checked, and the build is asked for
        with pytest.raises(MissingIndex, match="breast_cancer version 1"):
            matcher.reveal(text, [PROJECT])
        assert indexer.idle(240), "the index was not built within 240 s"
        # every dataset of the project the output was checked for: breast_cancer and gbsg2
        assert sorted((b.version, b.ok) for b in built) == [
            ((PROJECT, DATASET, 1), True),
            ((PROJECT, "gbsg2", 1), True),
        ]
        found = matcher.reveal(text, [PROJECT])
    finally:
        indexer.close()
    # the rows the host's own index finds, with another key: the same data, indexed the same way
    expected = demo.rows(text, DATASET)
    assert len(expected) >= 5
    assert np.array_equal(found[f"{PROJECT}/{DATASET}"], expected)
    # root's and nobody else's, as ingest leaves them
    key = rowindex.key_path(site)
    assert key.read_bytes() != demo.key
    assert (key.stat().st_uid, stat.S_IMODE(key.stat().st_mode)) == (0, 0o600)
    where = rowindex.index_dir(site, PROJECT, DATASET, 1)
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in where.iterdir()} == {
        "header.json": 0o600,
        "entries.npy": 0o600,
        "dir.npy": 0o600,
    }
    assert not [p for p in where.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_version_that_cannot_be_indexed_stays_unchecked_is_logged_and_tried_again_later(demo, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(
        dataset_dir(demo.site.data_root, PROJECT, DATASET), dataset_dir(data, PROJECT, DATASET), symlinks=True
    )
    broken = dataset_dir(data, PROJECT, DATASET) / "versions" / "1" / DATA_FILE
    os.chmod(broken, 0o644)
    broken.write_bytes(b"PAR1 this is not a parquet file")
    site = claim_site(demo, tmp_path / "claim", data)
    built: list[Built] = []
    indexer = Indexer(site, logging.getLogger("test.indexer"), on_built=built.append, retry_seconds=3600)
    matcher = Matcher(site, on_missing=indexer.want)
    try:
        with caplog.at_level(logging.ERROR, logger="test.indexer"):
            with pytest.raises(MissingIndex):
                matcher.reveal(printed_rows(demo, 0, 5), [PROJECT])
            assert indexer.idle(240)
        (failed,) = built
        assert not failed.ok and failed.version == (PROJECT, DATASET, 1)
        assert "parquet" in failed.detail.lower(), failed.detail
        assert "could not build the row index of oncology/breast_cancer version 1" in caplog.text
        assert "outputs of its projects stay unchecked" in caplog.text
        # still unchecked, and not rebuilt at every output: it waits for retry_seconds
        with pytest.raises(MissingIndex):
            matcher.reveal(printed_rows(demo, 0, 5), [PROJECT])
        assert indexer.waiting() == 0 and len(built) == 1
        # once the data is readable and the wait is over, the next output has it built
        shutil.copyfile(dataset_dir(demo.site.data_root, PROJECT, DATASET) / "versions" / "1" / DATA_FILE, broken)
        indexer.retry_seconds = 0
        with pytest.raises(MissingIndex):
            matcher.reveal(printed_rows(demo, 0, 5), [PROJECT])
        assert indexer.idle(240)
        assert [b.ok for b in built] == [False, True]
        assert matcher.reveal(printed_rows(demo, 0, 5), [PROJECT])
    finally:
        indexer.close()
    assert not rowindex.stale(site, PROJECT, DATASET, 1, rowindex.load_key(site))


def test_a_version_is_built_once_however_many_outputs_ask_for_it(demo, tmp_path):
    site = claim_site(demo, tmp_path / "claim")
    built: list[Built] = []
    indexer = Indexer(site, logging.getLogger("test.indexer"), on_built=built.append)
    try:
        for _ in range(20):
            indexer.want(PROJECT, DATASET, 1)
        assert indexer.waiting() == 1
        assert indexer.idle(240)
        assert [b.ok for b in built] == [True]
    finally:
        indexer.close()


def test_stopping_the_service_ends_a_build_under_way_and_leaves_no_index_half_written(demo, tmp_path):
    site = claim_site(demo, tmp_path / "claim")
    indexer = Indexer(site, logging.getLogger("test.indexer"))
    indexer.want(PROJECT, DATASET, 1)
    indexer.close()
    assert indexer.waiting() == 0
    where = rowindex.index_dir(site, PROJECT, DATASET, 1)
    # either the build finished first (a whole index) or it was ended (none): never a part of one
    if where.exists():
        assert not rowindex.stale(site, PROJECT, DATASET, 1, rowindex.load_key(site))
    if where.parent.exists():
        assert not [p.name for p in where.parent.iterdir() if p.name.startswith(".")]
    indexer.want(PROJECT, DATASET, 1)  # a closed indexer starts nothing
    assert indexer.waiting() == 0


def test_the_builder_refuses_a_caller_that_is_not_root_and_a_version_that_is_not_published(demo, tmp_path):
    import subprocess

    site = claim_site(demo, tmp_path / "claim")
    nobody = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *builder_command(site, (PROJECT, DATASET, 1))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert nobody.returncode == 1 and "run as root" in nobody.stderr
    missing = subprocess.run(builder_command(site, (PROJECT, DATASET, 7)), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "version 7 has no readable manifest" in missing.stderr, missing.stderr
    assert not rowindex.index_dir(site, PROJECT, DATASET, 7).exists()


def test_the_service_checks_an_output_unchecked_until_it_has_built_the_index_then_withholds_its_rows(demo, tmp_path):
    site = claim_site(demo, tmp_path / "claim")
    store = EgressStore.for_site(site)
    service, indexer = assemble(site, store, CallerIsAlice.for_state_dir(site.state_dir), logging.getLogger("t"))
    alice = Member("alice", "pt-alice", 30001, (PROJECT,), ("researcher",))
    dump = printed_rows(demo, 0, site.egress.max_rows_per_output + 5)
    registry = service.metrics.registry
    try:
        first = service.check(alice, Context("k:1", "kernel", "k"), dump, dump)
        assert first["verdict"] == "withhold" and first["reason"] == "unchecked", first
        assert indexer.idle(240)
        assert value(registry, "paitient_egress_index_builds_total", outcome="ok") == 2  # breast_cancer, gbsg2
        assert value(registry, "paitient_egress_index_builds_waiting") == 0
        again = service.check(alice, Context("k:2", "kernel", "k"), dump, dump)
        assert again["verdict"] == "withhold" and again["reason"] == "rows", again
        # every printed row is found; the claim site's pseudonyms are new each run, and once (1 run in many)
        # a 26th row was counted as well: found rows err towards withholding, never towards letting out
        assert again["rows"][f"{PROJECT}/{DATASET}"] in (
            site.egress.max_rows_per_output + 5,
            site.egress.max_rows_per_output + 6,
        )
        few = printed_rows(demo, 0, 3)
        assert service.check(alice, Context("k:3", "kernel", "k"), few, few)["verdict"] == "forward"
    finally:
        indexer.close()
        service.close()
        store.close()


def test_an_index_built_with_a_new_key_is_loaded_with_it(demo, tmp_path, monkeypatch):
    """The matcher keeps the key it read; when the key is made anew (an operator's ``--reindex`` after it was
    lost) and a new version is then published, the service builds that version's index with the new key and
    the matcher reads the key again to load it, instead of refusing it (and asking for it) at each output."""
    from paitient.services.egress import matcher as matcher_module

    data = tmp_path / "data"
    shutil.copytree(
        dataset_dir(demo.site.data_root, PROJECT, DATASET), dataset_dir(data, PROJECT, DATASET), symlinks=True
    )
    site = claim_site(demo, tmp_path / "claim", data)
    monkeypatch.setattr(matcher_module, "RECHECK_SECONDS", 0.0)
    built: list[Built] = []
    indexer = Indexer(site, logging.getLogger("test.indexer"), on_built=built.append)
    matcher = Matcher(site, on_missing=indexer.want)
    text = printed_rows(demo, 0, 5)
    try:
        with pytest.raises(MissingIndex):
            matcher.reveal(text, [PROJECT])
        assert indexer.idle(240)
        assert len(matcher.reveal(text, [PROJECT])[f"{PROJECT}/{DATASET}"]) >= 5
        first_key = rowindex.load_key(site)
        rowindex.key_path(site).unlink()
        rowindex.reindex(site, every=True)
        assert rowindex.load_key(site) != first_key
        ds = dataset_dir(data, PROJECT, DATASET)
        shutil.copytree(ds / "versions" / "1", ds / "versions" / "2")
        os.symlink("versions/2", ds / ".current-2")
        os.replace(ds / ".current-2", ds / "current")
        with pytest.raises(MissingIndex, match="version 2"):
            matcher.reveal(text, [PROJECT])
        assert indexer.idle(240)
        assert len(matcher.reveal(text, [PROJECT])[f"{PROJECT}/{DATASET}"]) >= 5
        assert [(b.version[2], b.ok) for b in built] == [(1, True), (2, True)]
    finally:
        indexer.close()
