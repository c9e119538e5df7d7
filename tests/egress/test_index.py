"""The index itself: its size, what it leaves out, its key, and loading it back (mapped) from disk."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from paitient.rules.edm import THRESHOLD, EDMIndex, IndexError_, Keyed, Scan
from paitient.services.data import rowindex

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def test_the_demo_indexes_take_at_most_16_bytes_per_indexed_value(demo):
    for name, index in demo.indexes.items():
        h = index.header
        assert 0 < h["cells"] <= h["entries"], name
        assert index.nbytes == h["bytes"] == index.entries.nbytes + index.dir.nbytes
        assert index.bytes_per_cell <= 16, (name, index.bytes_per_cell)
        assert index.bytes_per_entry <= 10, (name, index.bytes_per_entry)


def test_the_index_holds_no_values(demo):
    """Nothing of a cell can be read off the saved index: neither text nor the numbers as stored."""
    project, dataset = "oncology", "breast_cancer"
    folder = rowindex.index_dir(demo.site, project, dataset, 1)
    raw = b"".join(p.read_bytes() for p in folder.iterdir())
    df = demo.frames[dataset]
    for pseudonym in df["patient"].head(50):
        assert pseudonym.encode() not in raw and pseudonym.lower().encode() not in raw
    for day in df["diagnosis_date"].astype(str).head(50):
        assert day.encode() not in raw
    for v in df["mean smoothness"].head(50):  # values with full mantissas (a round 1088.0 is mostly zeros)
        assert np.float64(v).tobytes() not in raw and np.float32(v).tobytes() not in raw
    header = json.loads((folder / "header.json").read_text())
    assert set(header) >= {"format", "rows", "columns", "threshold", "entries", "cells", "bytes", "key_id"}


def test_frequent_values_are_not_indexed():
    rng = np.random.default_rng(1)
    n = 2000
    table = pa.table(
        {
            "category": rng.choice(["Post-menopausal", "Pre-menopausal"], n),  # long words, but everyone's
            "grade": rng.choice([1.25, 2.5, 3.75], n),  # three values shared by hundreds
            "rare": np.concatenate([[123.456, 123.456, 123.456, 654.321, 654.321, 654.321, 654.321], np.zeros(n - 7)]),
            "unique": rng.normal(100, 10, n),
        }
    )
    index = EDMIndex.build(table, key=KEY)
    per = index.header["entries_per_column"]
    assert per["category"] == 0 and per["grade"] == 0
    assert index.header["threshold"] == THRESHOLD == 3
    # 123.456 is in 3 rows: indexed; 654.321 in 4: not (zeros are no value)
    assert list(Scan("123.456 123.456 123.456").rows(EDMIndex.build(table.select(["rare"] * 1), key=KEY))) == []
    rare = EDMIndex.build(pa.table({"a": table["rare"], "b": table["rare"], "c": table["rare"]}), key=KEY)
    assert list(Scan("123.456 123.456 123.456").rows(rare)) == [0, 1, 2]
    assert list(Scan("654.321 654.321 654.321").rows(rare)) == []
    assert per["unique"] >= n  # each value, at least once


def test_a_pseudonym_reveals_every_row_of_its_patient_whatever_their_number():
    ids = ["P-AAAAAAAAAAAAAAAA"] * 10 + ["P-BBBBBBBBBBBBBBBB"] * 2 + [f"P-C{i:015d}" for i in range(20)]
    table = pa.table({"patient": ids, "x": np.arange(len(ids), dtype=float)})
    index = EDMIndex.build(table, key=KEY, primary_columns=["patient"])
    assert list(Scan("seen: P-AAAAAAAAAAAAAAAA").rows(index)) == list(range(10))
    assert list(Scan("p-bbbbbbbbbbbbbbbb").rows(index)) == [10, 11]  # case does not matter
    assert list(Scan("P-AAAAAAAAAAAAAAA").rows(index)) == []  # one character short: another word
    not_primary = EDMIndex.build(table, key=KEY)
    assert list(Scan("seen: P-BBBBBBBBBBBBBBBB").rows(not_primary)) == []  # one word is not three columns


def test_another_key_matches_nothing(demo):
    table = pa.Table.from_pandas(demo.frames["breast_cancer"], preserve_index=False)
    ours = EDMIndex.build(table, key=KEY, primary_columns=["patient"])
    theirs = EDMIndex.build(table, key=OTHER_KEY, primary_columns=["patient"])
    dump = demo.frames["breast_cancer"].to_csv()
    assert len(Scan(dump).rows(ours)) == len(table)
    # the other key's index, asked with our fingerprints: the arrays match nothing
    forged = EDMIndex(dict(theirs.header, key_id=ours.keyed.key_id), theirs.arrays(), ours.keyed)
    assert len(Scan(dump).rows(forged)) == 0
    assert not np.isin(ours.entries, theirs.entries).any()


def test_an_index_refuses_to_be_used_with_another_key(demo):
    index = demo.indexes["gbsg2"]
    with pytest.raises(IndexError_, match="another row-detection key"):
        EDMIndex(index.header, index.arrays(), Keyed(OTHER_KEY))
    folder = rowindex.index_dir(demo.site, "oncology", "gbsg2", 1)
    with pytest.raises(rowindex.IndexRefused, match="reindex"):
        rowindex.load(folder, OTHER_KEY)


def test_a_saved_index_loads_mapped_and_answers_like_the_built_one(demo):
    folder = rowindex.index_dir(demo.site, "oncology", "breast_cancer", 1)
    mapped = rowindex.load(folder, demo.key, mmap=True)
    read = rowindex.load(folder, demo.key, mmap=False)
    assert isinstance(mapped.entries, np.memmap) and not isinstance(read.entries, np.memmap)
    assert np.array_equal(mapped.entries, read.entries) and np.array_equal(mapped.dir, read.dir)
    table = pa.Table.from_pandas(demo.frames["breast_cancer"], preserve_index=False)
    built = EDMIndex.build(table, key=demo.key, primary_columns=["patient"])
    assert np.array_equal(built.entries, mapped.entries)
    text = demo.frames["breast_cancer"].iloc[100:140].to_string()
    got = Scan(text).rows(mapped).tolist()
    assert got == Scan(text).rows(built).tolist()
    assert set(range(100, 140)) <= set(got) and len(got) <= 42  # a chance one or two besides, see test_attacks


def test_a_damaged_index_is_refused_with_what_to_do(demo, tmp_path):
    index = demo.indexes["diabetes"]
    with pytest.raises(IndexError_, match="do not fit its header"):
        EDMIndex(index.header, {"entries": index.entries, "dir": index.dir[:-1]}, index.keyed)
    with pytest.raises(IndexError_, match="format"):
        EDMIndex(dict(index.header, format=0), index.arrays(), index.keyed)
    with pytest.raises(rowindex.IndexRefused, match="paitient datasets --reindex"):
        rowindex.load(tmp_path / "nothing-here", demo.key)


def test_build_refuses_unknown_primary_columns_and_a_bad_threshold():
    table = pa.table({"a": [1.5, 2.5]})
    with pytest.raises(IndexError_, match="not in the table"):
        EDMIndex.build(table, key=KEY, primary_columns=["patient"])
    with pytest.raises(IndexError_, match="at least 1 row"):
        EDMIndex.build(table, key=KEY, threshold=0)
    with pytest.raises(ValueError, match="32 random bytes"):
        Keyed(b"short")


def test_an_empty_table_gives_an_empty_index_that_finds_nothing():
    index = EDMIndex.build(pa.table({"a": pa.array([], pa.float64())}), key=KEY)
    assert len(index) == 0
    assert list(Scan("1.234 5.678 9.101").rows(index)) == []
