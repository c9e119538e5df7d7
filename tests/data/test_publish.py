"""Publication is all or nothing: a failure or a crash at any step leaves the previous version current."""

import json
import multiprocessing
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from paitient.services.data.publish import Publisher, current_version, dataset_dir, read_manifest, versions

TABLE = pa.table({"patient": ["P-A", "P-B"], "score": [1.0, 2.0]})


class Boom(Exception):
    pass


class FailingPublisher(Publisher):
    """A real publisher whose step ``fail_at`` raises (after doing part of its work)."""

    def __init__(self, data_root, lock_dir, fail_at):
        super().__init__(data_root, lock_dir)
        self.fail_at = fail_at

    def write_version(self, tmp, table, manifest):
        if self.fail_at == "write":
            pq.write_table(table, tmp / "data.parquet")  # half the files are there
            raise Boom("disk full")
        super().write_version(tmp, table, manifest)

    def place(self, tmp, final):
        if self.fail_at == "place":
            raise Boom("rename failed")
        super().place(tmp, final)

    def switch_current(self, ds, version):
        if self.fail_at == "switch":
            raise Boom("symlink failed")
        super().switch_current(ds, version)


class CrashingPublisher(Publisher):
    """Dies like a killed process (no cleanup, no exception handling) at step ``crash_at``."""

    def __init__(self, data_root, lock_dir, crash_at):
        super().__init__(data_root, lock_dir)
        self.crash_at = crash_at

    def place(self, tmp, final):
        if self.crash_at == "place":
            os._exit(9)
        super().place(tmp, final)

    def switch_current(self, ds, version):
        if self.crash_at == "switch":
            os._exit(9)
        super().switch_current(ds, version)


@pytest.fixture
def roots(tmp_path):
    data_root, locks = tmp_path / "data", tmp_path / "locks"
    Publisher(data_root, locks).publish("oncology", "gbsg2", TABLE, {"note": "first", "rows": 2})
    return data_root, locks, dataset_dir(data_root, "oncology", "gbsg2")


def assert_still_v1(ds):
    assert current_version(ds) == 1 and read_manifest(ds)["note"] == "first"
    assert pq.read_table(ds / "current" / "data.parquet").num_rows == 2


@pytest.mark.parametrize("step", ["write", "place", "switch"])
def test_a_failing_step_leaves_nothing_and_the_previous_version_current(roots, step):
    data_root, locks, ds = roots
    with pytest.raises(Boom):
        FailingPublisher(data_root, locks, step).publish("oncology", "gbsg2", TABLE, {"note": "second"})
    assert_still_v1(ds)
    assert versions(ds) == [1]
    assert sorted(p.name for p in ds.iterdir()) == ["current", "versions"]  # no temp dir, no temp link


@pytest.mark.parametrize("step", ["place", "switch"])
def test_a_crash_leaves_the_previous_version_current_and_is_cleaned_up(roots, step):
    data_root, locks, ds = roots
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(
        target=lambda: CrashingPublisher(data_root, locks, step).publish(
            "oncology", "gbsg2", TABLE, {"note": "crashed"}
        )
    )
    child.start()
    child.join(30)
    assert child.exitcode == 9
    assert_still_v1(ds)
    if step == "place":  # the written version never got its name
        assert versions(ds) == [1] and [p.name for p in ds.iterdir() if p.name.startswith(".tmp-")]
    else:  # in place, never current: no reader saw it
        assert versions(ds) == [1, 2]
    pub = Publisher(data_root, locks).publish("oncology", "gbsg2", TABLE, {"note": "third"})
    assert current_version(ds) == pub.version and read_manifest(ds)["note"] == "third"
    assert not [p for p in ds.iterdir() if p.name.startswith(".")]
    # what the crash left is gone, and its number is not taken again
    assert versions(ds) == [1, pub.version] and pub.version == (2 if step == "place" else 3)


def test_readers_see_whole_versions_only_while_publishing(roots):
    data_root, locks, ds = roots
    stop, seen, errors = threading.Event(), set(), []

    def read():
        while not stop.is_set():
            try:
                folder = (ds / "current").resolve()
                manifest = json.loads((folder / "manifest.json").read_text())
                rows = pq.read_table(folder / "data.parquet").num_rows
                assert manifest["version"] == int(folder.name) and rows == manifest["rows"]
                seen.add(manifest["version"])
            except Exception as e:  # noqa: BLE001 - any failure to read is the finding
                errors.append(repr(e))

    t = threading.Thread(target=read)
    t.start()
    try:
        for i in range(2, 12):
            table = pa.table({"patient": [f"P-{j}" for j in range(i)], "score": [1.0] * i})
            Publisher(data_root, locks).publish("oncology", "gbsg2", table, {"rows": i})
    finally:
        stop.set()
        t.join()
    assert errors == [] and len(seen) >= 2 and current_version(ds) == 11


def test_dictionaries_read_back_as_values_and_only_numbers_and_dates_carry_statistics(tmp_path):
    import datetime as dt

    table = pa.table(
        {
            "patient": pa.array(["P-A", "P-B", "P-A"]).dictionary_encode(),
            "sex": ["F", "M", "F"],
            "score": [1.0, 2.0, 3.0],
            "seen": pa.array([dt.date(2020, 1, 1)] * 3),
        }
    )
    pub = Publisher(tmp_path / "data", tmp_path / "locks").publish("oncology", "gbsg2", table, {"rows": 3})
    f = pq.ParquetFile(pub.path / "data.parquet")
    assert f.read().column("patient").type == pa.string()
    assert f.read().column("patient").to_pylist() == ["P-A", "P-B", "P-A"]
    rg = f.metadata.row_group(0)
    stats = {rg.column(i).path_in_schema: rg.column(i).is_stats_set for i in range(rg.num_columns)}
    assert stats == {"patient": False, "sex": False, "score": True, "seen": True}
    assert rg.column(2).statistics.max == 3.0


def test_a_dictionary_is_published_with_the_values_its_rows_use_only(tmp_path):
    # whoever hands the publisher a table, a dictionary value that no row holds (another person's name
    # in a category list) does not reach the file
    ward = pa.DictionaryArray.from_arrays(pa.array([0, 2, 0], pa.int32()), pa.array(["A", "Erika Mustermann", "B"]))
    pub = Publisher(tmp_path / "data", tmp_path / "locks").publish("oncology", "gbsg2", pa.table({"ward": ward}), {})
    path = pub.path / "data.parquet"
    column = pq.ParquetFile(path, read_dictionary=["ward"]).read().column("ward")
    assert column.chunk(0).dictionary.to_pylist() == ["A", "B"]
    assert column.cast(pa.string()).to_pylist() == ["A", "B", "A"]
    assert b"Erika Mustermann" not in path.read_bytes()
