"""A job request checked field by field, the rows it trains on, and the queue that survives a crash, on
SQLite and on PostgreSQL."""

import math
import re
import sqlite3
import stat
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest

from paitient.rules.jobspec import SpecError, check_request
from paitient.services.jobs.data import prepare
from paitient.services.jobs.store import STOPPED_MID_JOB, JobError, JobStore
from paitient.services.kit.db import DatabaseError
from tests import legacy_schemas

BASE = {"dataset": "breast_cancer", "target": "target", "epochs": 5, "batch_size": 64, "max_grad_norm": 1.0,
        "target_epsilon": 1.0}  # fmt: skip


def test_a_request_gets_its_defaults():
    spec = check_request(BASE)
    assert spec["loss"] == "cross_entropy" and spec["optimizer"] == "sgd" and spec["features"] is None
    assert (spec["lr"], spec["holdout"], spec["preprocessing"], spec["project"]) == (0.1, 0.2, [], None)
    assert spec["checkpoint"] is None  # the runner's own initialisation
    assert check_request({**BASE, "checkpoint": "mlp-public"})["checkpoint"] == "mlp-public"
    assert spec["momentum"] == 0.0 and check_request({**BASE, "momentum": 0.5})["momentum"] == 0.5
    assert spec["init"] == "default" and check_request({**BASE, "init": "zeros"})["init"] == "zeros"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "epochs must be a whole number from 1 to 1000"),
        ({"epochs": 2.5}, "epochs must be a whole number"),
        ({"target_epsilon": math.inf}, "target_epsilon must be a number"),
        ({"target_epsilon": None}, "target_epsilon is required"),
        ({"loss": "hinge"}, "loss must be one of cross_entropy, bce_with_logits, smooth_hinge, mse"),
        ({"momentum": 1.0}, "momentum must be a number from 0 to 0.99"),
        ({"momentum": 0.123}, "momentum must have at most 2 significant digits"),
        ({"optimizer": "adam", "momentum": 0.5}, "momentum is sgd's; adam takes none"),
        ({"init": "ones"}, "init must be one of default, zeros"),
        ({"init": "zeros", "checkpoint": "mlp-public"}, "give a checkpoint or init, not both"),
        ({"dataset": "../etc"}, "dataset must be a dataset's name"),
        ({"features": ["a", "a"]}, "features names a column twice"),
        ({"features": ["target"]}, "the target cannot be one of the features"),
        ({"code": "import os"}, "a job takes"),
        ({"checkpoint": "../index.json"}, "checkpoint must be the name of a checkpoint in the registry"),
        ({"checkpoint": {"0.weight": [0.5]}}, "checkpoint must be the name"),
        ({"checkpoint_sha256": "0" * 64}, "a job takes"),  # the runner pins the file, never the kernel
        ({"preprocessing": [{"op": "eval", "expr": "1"}]}, "preprocessing op 'eval' is not one of"),
        ({"preprocessing": [{"op": "standardise", "columns": ["a"], "mean": [0], "std": [0]}]}, "std must be above 0"),
        ({"preprocessing": [{"op": "fill", "columns": ["a"], "value": 0, "lambda": 1}]}, "a fill step takes"),
    ],
)
def test_a_bad_request_says_which_field_and_what_it_must_be(change, message):
    request = {**BASE, **change}
    if change.get("target_epsilon", 1) is None:
        del request["target_epsilon"]
    with pytest.raises(SpecError, match=message):
        check_request(request)


@pytest.fixture
def data_file(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "age": rng.integers(20, 90, 200).astype(float),
            "bmi": rng.normal(27, 4, 200),
            "site": rng.choice(["a", "b", "c"], 200),
            "target": rng.integers(0, 2, 200),
        }
    )
    frame.loc[3, "bmi"] = np.nan
    path = tmp_path / "data.parquet"
    frame.to_parquet(path)
    return path


def test_rows_are_preprocessed_as_declared_and_split_by_the_runners_seed(tmp_path, data_file):
    import pyarrow.parquet as pq

    data_file = _publish_like(pq.read_table(data_file).to_pandas(), tmp_path / "cohort" / "versions" / "1")
    spec = check_request(
        {
            **BASE,
            "preprocessing": [
                {"op": "fill", "columns": ["bmi"], "value": 27.0},
                {"op": "standardise", "columns": ["age", "bmi"], "mean": [55, 27], "std": [20, 4]},
                {"op": "onehot", "column": "site", "categories": ["a", "b"]},
            ],
        }
    )
    p = prepare(data_file, spec, split_seed=7)
    assert p.features == ["age", "bmi", "site=a", "site=b"]
    assert (len(p.x_train), len(p.x_holdout)) == (160, 40) and p.x_train.dtype == np.float32
    assert p.classes == 2 and set(np.unique(p.y_train)) <= {0, 1}
    again = prepare(data_file, spec, split_seed=7)
    assert np.array_equal(p.x_holdout, again.x_holdout)  # the seed decides the split
    assert not np.array_equal(p.x_holdout, prepare(data_file, spec, split_seed=8).x_holdout)
    assert len(p.dataset_sha256) == 64


def test_missing_values_and_text_are_refused_with_what_to_do(data_file):
    with pytest.raises(SpecError, match="bmi have missing values; add a fill step"):
        prepare(data_file, check_request(BASE), split_seed=1)
    with pytest.raises(SpecError, match="feature 'site' holds text, not numbers: one-hot encode it"):
        prepare(data_file, check_request({**BASE, "features": ["age", "site"]}), split_seed=1)
    with pytest.raises(SpecError, match="has no column 'outcome'"):
        prepare(data_file, check_request({**BASE, "target": "outcome"}), split_seed=1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target": "patient", "loss": "mse"}, "the target 'patient' holds text, not numbers: mse needs a numeric"),
        ({"target": "note", "loss": "mse"}, "the target 'note' holds text"),
        ({"features": ["age", "note"]}, "feature 'note' holds text, not numbers: one-hot encode it"),
        ({"features": ["age", "seen"]}, "feature 'seen' holds dates or times, not numbers"),
        (
            {"features": ["age", "note"], "preprocessing": [{"op": "fill", "columns": ["note"], "value": 0}]},
            "fill names column 'note', which holds text, not numbers: one-hot encode it",
        ),
        (
            {"features": ["age", "patient"],
             "preprocessing": [{"op": "standardise", "columns": ["patient"], "mean": [0], "std": [1]}]},
            "standardise names column 'patient', which holds text",
        ),
    ],
)  # fmt: skip
def test_a_text_column_where_numbers_are_needed_is_refused_by_name_quoting_no_value(tmp_path, change, message):
    """pandas' and numpy's own errors quote the cell they failed on ("could not convert string to float:
    'P-7f3a91c2'"), and a job's reason goes to its owner and the audit trail: the column's kind is checked from
    its dtype first, and the refusal names the column and what to do."""
    frame = pd.DataFrame(
        {
            "patient": [f"P-{i:04d}7f3a" for i in range(20)],
            "note": ["Jane Roe, HIV+", "Smith J., diabetic"] * 10,
            "seen": pd.date_range("2020-01-01", periods=20),
            "age": np.linspace(30, 70, 20),
            "target": [0, 1] * 10,
        }
    )
    path = tmp_path / "data.parquet"
    frame.to_parquet(path)
    with pytest.raises(SpecError, match=re.escape(message)) as refused:
        prepare(path, check_request({**BASE, **change}), split_seed=1)
    said = str(refused.value)
    assert not any(str(v) in said for c in ("patient", "note") for v in frame[c])


def _publish_like(frame: pd.DataFrame, folder: Path, min_count: int = 5) -> Path:
    """The frame as a dataset version: its Parquet and a manifest whose columns carry the catalogue's
    statistics, as the ingest writes them."""
    import json

    import pyarrow as pa

    from paitient.rules.catalogue import column_statistics

    folder.mkdir(parents=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    columns = [{"name": c, "action": "pseudonym" if c == "patient" else "keep"} for c in frame.columns]
    stats = column_statistics(table, columns, min_count=min_count)
    (folder / "manifest.json").write_text(json.dumps({"columns": [{**c, **stats.get(c["name"], {})} for c in columns]}))
    frame.to_parquet(folder / "data.parquet")
    return folder / "data.parquet"


def test_the_catalogue_keeps_aggregates_of_number_columns_and_categories_held_by_enough_rows():
    import pyarrow as pa

    from paitient.rules.catalogue import column_statistics

    table = pa.table(
        {
            "patient": ["p1", "p2", "p3", "p4", "p5", "p6"],
            "bmi": [20.0, 22.0, None, 26.0, 28.0, 30.0],
            "stage": [1, 1, 1, 2, 2, 2],
            "site": ["a", "a", "a", "b", "b", "rare"],
            "flat": [1.0] * 6,
        }
    )
    columns = [{"name": "patient", "action": "pseudonym"}] + [
        {"name": c, "action": "keep"} for c in table.column_names[1:]
    ]
    stats = column_statistics(table, columns, min_count=3)
    assert "patient" not in stats and "site" not in stats  # a pseudonym; "rare" has one row, so no categories
    assert stats["bmi"] == {
        "count": 5,
        "mean": 25.2,
        "std": float(f"{np.std([20, 22, 26, 28, 30], ddof=1):.4g}"),  # 4.041, to four significant digits
    }
    assert stats["stage"]["categories"] == [1, 2] and stats["stage"]["mean"] == pytest.approx(1.5)
    assert "mean" not in stats.get("flat", {})  # no spread: nothing to standardise by
    many = pa.table({"code": [str(i) for i in range(60)] * 10})
    assert column_statistics(many, [{"name": "code", "action": "keep"}], min_count=3) == {}


def test_steps_without_constants_take_them_from_the_catalogue_of_the_version_read(tmp_path):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {"age": rng.normal(60, 10, 120), "site": rng.choice(["a", "b"], 120), "target": rng.integers(0, 2, 120)}
    )
    data_file = _publish_like(frame, tmp_path / "breast_cancer" / "versions" / "3")
    spec = check_request(
        {**BASE, "preprocessing": [{"op": "standardise", "columns": ["age"]}, {"op": "onehot", "column": "site"}]}
    )
    assert spec["preprocessing"] == [
        {"op": "standardise", "columns": ["age"], "from": "catalogue"},
        {"op": "onehot", "column": "site", "from": "catalogue"},
    ]
    p = prepare(data_file, spec, split_seed=3)
    mean, std = (float(f"{v:.4g}") for v in (frame["age"].mean(), frame["age"].std()))
    assert p.preprocessing == [
        {"op": "standardise", "columns": ["age"], "mean": [mean], "std": [std], "from": "catalogue"},
        {"op": "onehot", "column": "site", "categories": ["a", "b"], "from": "catalogue"},
    ]  # fmt: skip
    assert p.features == ["age", "site=a", "site=b"]
    everything = np.concatenate([p.x_train, p.x_holdout])
    # standardised by the rounded constants: near 0 and 1, to the rounding
    assert everything[:, 0].mean() == pytest.approx(0, abs=1e-3) and everything[:, 0].std(ddof=1) == pytest.approx(
        1, rel=1e-3
    )


def test_a_value_one_patient_holds_on_many_rows_is_not_catalogued():
    """Attack: one patient's six rows of a rare occupation and ward, beside forty patients of two rows each. The
    catalogue counted rows, so "astronaut" (6 rows, 1 patient) was a category at a minimum of 5, and left in a
    signed record's onehot step and as an airlock table's label without a steward. Patients are counted now."""
    import pyarrow as pa

    from paitient.rules.catalogue import column_statistics

    jobs = ["clerk", "driver", "nurse", "teacher"]
    patients = [p for p in range(40) for _ in range(2)] + [40] * 6
    occupation = [jobs[p % 4] for p in range(40) for _ in range(2)] + ["astronaut"] * 6
    ward = [50 + p % 6 for p in range(40) for _ in range(2)] + [61] * 6
    table = pa.table({"occupation": occupation, "ward": ward})
    columns = [{"name": "occupation", "action": "keep"}, {"name": "ward", "action": "keep"}]
    by_patients = column_statistics(table, columns, min_count=5, patients=np.array(patients))
    assert "categories" not in by_patients.get("occupation", {}) and "categories" not in by_patients["ward"]
    # without the rare patient's rows, each value is held by at least 6 patients: catalogued
    common = column_statistics(table.slice(0, 80), columns, min_count=5, patients=np.array(patients[:80]))
    assert common["occupation"]["categories"] == jobs and common["ward"]["categories"] == list(range(50, 56))


def test_two_versions_one_patient_apart_do_not_give_back_the_patients_value():
    """Attack: a record states the rows it read beside the catalogue's mean; the records of two versions, the
    second without one patient (consent withdrawn), gave back that patient's value as n1 * mean1 - n2 * mean2
    (14.1 exactly, of 500 haemoglobin values). The catalogue's mean and spread are rounded to four significant
    digits (here to 0.01, so the difference of n * mean is off by up to 5): both versions state the same mean,
    and the difference is that mean again, not the patient's value."""
    import pyarrow as pa

    from paitient.rules.catalogue import column_statistics

    rng = np.random.default_rng(7)
    values = np.round(rng.normal(13.5, 1.2, 500), 1)
    values[123] = 14.1
    columns = [{"name": "hb", "action": "keep"}]
    first = column_statistics(pa.table({"hb": values}), columns, min_count=5)["hb"]
    second = column_statistics(pa.table({"hb": np.delete(values, 123)}), columns, min_count=5)["hb"]
    assert (first["count"], second["count"]) == (500, 499)
    for stats in (first, second):
        assert stats["mean"] == float(f"{stats['mean']:.4g}") and stats["std"] == float(f"{stats['std']:.4g}")
    recovered = first["count"] * first["mean"] - second["count"] * second["mean"]
    exact = 500 * values.mean() - 499 * np.delete(values, 123).mean()
    assert exact == pytest.approx(14.1)  # what full precision gave
    assert (first["mean"], first["std"]) == (second["mean"], second["std"])
    assert recovered == pytest.approx(first["mean"]) and abs(recovered - 14.1) > 0.5, recovered


def test_a_catalogue_without_the_statistic_says_what_to_give_instead(tmp_path, data_file):
    frame = pd.DataFrame(
        {"age": [float(i) for i in range(40)], "code": [str(i) for i in range(40)], "target": [0, 1] * 20}
    )
    published = _publish_like(frame, tmp_path / "cohort" / "versions" / "2")
    onehot = check_request({**BASE, "preprocessing": [{"op": "onehot", "column": "code"}]})
    with pytest.raises(
        SpecError, match=r"catalogue of cohort version 2 lists no categories for code .*leave the column out"
    ):
        prepare(published, onehot, split_seed=1)
    standardise = check_request({**BASE, "preprocessing": [{"op": "standardise", "columns": ["age"]}]})
    with pytest.raises(SpecError, match=r"no mean and spread for age .*give mean= and std="):
        prepare(data_file, standardise, split_seed=1)  # a version with no manifest at all


def test_a_onehot_takes_only_categories_the_catalogue_names(tmp_path):
    """A value held by too few rows for the catalogue to name cannot leave as a category of the signed record."""
    frame = pd.DataFrame(
        {"age": [float(i) for i in range(60)], "ward": ["north"] * 30 + ["south"] * 28 + ["Zq7-rare"] * 2,
         "site": ["a", "b"] * 30, "target": [0, 1] * 30}
    )  # fmt: skip
    published = _publish_like(frame, tmp_path / "cohort" / "versions" / "4")
    rare = check_request({**BASE, "preprocessing": [{"op": "onehot", "column": "ward", "categories": ["Zq7-rare"]}]})
    named = r"^1 of the 1 categories given for ward are not among those the catalogue of cohort version 4 names"
    with pytest.raises(SpecError, match=named + r" for it \(0\): a onehot step takes only"):
        prepare(published, rare, split_seed=1)
    made_up = check_request({**BASE, "features": ["age", "site"], "preprocessing": [
        {"op": "onehot", "column": "site", "categories": ["b", "PATIENT 4711"]}]})  # fmt: skip
    with pytest.raises(SpecError, match=r"^1 of the 2 categories given for site .* names for it \(2\)") as e:
        prepare(published, made_up, split_seed=1)
    assert "4711" not in str(e.value)
    chosen = check_request({**BASE, "features": ["age", "site"], "preprocessing": [
        {"op": "onehot", "column": "site", "categories": ["b"]}]})  # fmt: skip
    p = prepare(published, chosen, split_seed=1)
    assert p.features == ["age", "site=b"] and p.preprocessing[0]["categories"] == ["b"]
    # A category is the catalogue's as it types it: 1 and "1" are not one category, and none is named twice.
    typed = pd.DataFrame({"age": [float(i) for i in range(60)], "stage": [1, 2] * 30, "target": [0, 1] * 30})
    staged = _publish_like(typed, tmp_path / "staged" / "versions" / "1")
    as_text = check_request({**BASE, "features": ["age", "stage"], "preprocessing": [
        {"op": "onehot", "column": "stage", "categories": [2, "1"]}]})  # fmt: skip
    with pytest.raises(SpecError, match=r"^1 of the 2 categories given for stage .*as the catalogue types them"):
        prepare(staged, as_text, split_seed=1)
    with pytest.raises(SpecError, match="onehot categories name a category twice"):
        check_request({**BASE, "preprocessing": [{"op": "onehot", "column": "stage", "categories": [1, 2, 1]}]})
    # The record lists them in the catalogue's order, whatever order they were given in.
    reordered = check_request({**BASE, "features": ["age", "stage"], "preprocessing": [
        {"op": "onehot", "column": "stage", "categories": [2, 1]}]})  # fmt: skip
    assert prepare(staged, reordered, split_seed=1).preprocessing[0]["categories"] == [1, 2]


def test_the_arrangement_of_steps_and_features_is_the_runners_not_the_researchers(tmp_path):
    """Steps in any order, columns in any order, split across steps: the record states one arrangement, the
    same for all of them (an order or a split of the researcher's choosing would be bits of theirs in it)."""
    rng = np.random.default_rng(2)
    frame = pd.DataFrame(
        {c: rng.normal(50, 10, 80) for c in ("a", "b", "c", "d")} | {"site": rng.choice(["x", "y"], 80),
         "target": rng.integers(0, 2, 80)}
    )  # fmt: skip
    frame.loc[5, "c"] = np.nan
    published = _publish_like(frame, tmp_path / "cohort" / "versions" / "1")
    arrangements = [
        [{"op": "standardise", "columns": ["d", "b"]}, {"op": "onehot", "column": "site"},
         {"op": "fill", "columns": ["c"], "value": 50}, {"op": "standardise", "columns": ["c", "a"]}],
        [{"op": "fill", "columns": ["c"], "value": 50.0}, {"op": "standardise", "columns": ["a", "b", "c", "d"]},
         {"op": "onehot", "column": "site"}],
        [{"op": "onehot", "column": "site"}, {"op": "standardise", "columns": ["a"]},
         {"op": "standardise", "columns": ["d"]}, {"op": "standardise", "columns": ["c", "b"]},
         {"op": "fill", "columns": ["c"], "value": 50}],
    ]  # fmt: skip
    features = [["site", "d", "c", "b", "a"], ["a", "b", "c", "d", "site"], ["c", "site", "a", "d", "b"]]
    prepared = [
        prepare(published, check_request({**BASE, "features": f, "preprocessing": steps}), split_seed=4)
        for f, steps in zip(features, arrangements, strict=True)
    ]
    first = prepared[0]
    assert [s["op"] for s in first.preprocessing] == ["fill", "standardise", "onehot"]
    assert first.preprocessing[1]["columns"] == ["a", "b", "c", "d"] and first.preprocessing[1]["from"] == "catalogue"
    assert first.features == ["a", "b", "c", "d", "site=x", "site=y"]
    for p in prepared[1:]:
        assert (p.preprocessing, p.features) == (first.preprocessing, first.features)
        assert np.array_equal(p.x_train, first.x_train)
    # The fill comes first whatever its place: the filled value is standardised like the others.
    assert not np.isnan(first.x_train).any()
    twice = [{"op": "standardise", "columns": ["a"]}, {"op": "standardise", "columns": ["b", "a"]}]
    with pytest.raises(SpecError, match="standardise names column 'a' twice; name each column in one"):
        prepare(published, check_request({**BASE, "features": ["a", "b"], "preprocessing": twice}), split_seed=1)
    with pytest.raises(SpecError, match="fill names column 'zz', which the dataset does not have"):
        prepare(published, check_request({**BASE, "features": ["a"], "preprocessing": [
            {"op": "fill", "columns": ["zz"], "value": 1}]}), split_seed=1)  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_grad_norm", 1.23456, "max_grad_norm must have at most 4 significant digits .*1.235 instead of 1.23456"),
        ("target_epsilon", 0.987654321, "target_epsilon must have at most 4 significant digits .*give 0.9877"),
        ("preprocessing", [{"op": "standardise", "columns": ["a"], "mean": [14.127], "std": [3.5]}],
         "standardise mean must have at most 4 significant digits .*give 14.13 instead of 14.127"),
        ("preprocessing", [{"op": "standardise", "columns": ["a"], "mean": [14.13], "std": [3.52401]}],
         "standardise std must have at most 4 significant digits"),
        ("preprocessing", [{"op": "fill", "columns": ["a"], "value": 1234567}],
         r"fill value must have at most 4 significant digits .*give 1.235e\+06"),
        # Four digits at any size would still leave the exponent free: sizes are bounded too.
        ("preprocessing", [{"op": "fill", "columns": ["a"], "value": 1.234e-300}],
         r"fill value must be 0 or between 1e-06 and 1e\+09 in size .*got 1.234e-300"),
        ("preprocessing", [{"op": "standardise", "columns": ["a"], "mean": [-9.999e299], "std": [1]}],
         "standardise mean must be 0 or between 1e-06 and 1e"),
        ("max_grad_norm", 5e-7, "max_grad_norm must be a number from 1e-06 to 1000"),
        # Not in the record, but it moves the weights: a learning rate of any precision is bits in them.
        ("lr", 0.123456789, r"lr must have at most 2 significant digits \(it moves the released weights\): give 0.12"),
    ],
)  # fmt: skip
def test_numbers_that_leave_with_the_signed_record_have_four_significant_digits(field, value, message):
    with pytest.raises(SpecError, match=message):
        check_request({**BASE, field: value})
    short = {"max_grad_norm": 1.235, "target_epsilon": 0.9877, "preprocessing": [
        {"op": "standardise", "columns": ["a", "b"], "mean": [14.13, -0.001234], "std": [3.5, 1e-6]},
        {"op": "fill", "columns": ["a"], "value": -0.0}]}  # fmt: skip
    spec = check_request({**BASE, **short, "lr": 0.00012})
    assert (spec["max_grad_norm"], spec["target_epsilon"], spec["lr"]) == (1.235, 0.9877, 0.00012)
    assert spec["preprocessing"][0]["mean"] == [14.13, -0.001234]
    assert str(spec["preprocessing"][1]["value"]) == "0.0"  # not -0.0: its sign bit would be one more bit


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"op": "standardise", "columns": ["a"], "mean": [0], "from": "catalogue"}, "from the catalogue or from you"),
        ({"op": "onehot", "column": "a", "from": "notebook"}, "from= must be 'catalogue'"),
    ],
)
def test_constants_come_from_one_place(step, message):
    with pytest.raises(SpecError, match=message):
        check_request({**BASE, "preprocessing": [step]})


@pytest.fixture
def site(database_site):
    """A site whose queue is in the parametrised database (SQLite under its state_dir, then PostgreSQL)."""
    return database_site


@pytest.fixture
def open_store(site, opened_stores):
    """Opens the site's queue as the service does (``JobStore.for_site``); every store opened is closed after."""
    return lambda: opened_stores(JobStore.for_site(site))


def test_the_queue_is_where_the_site_says(site, open_store):
    store = open_store()
    job = store.submit(username="alice", project="onc", dataset="bc", spec={"epochs": 1}, graph_sha256="f" * 64)
    path = site.state_dir / "jobs" / "jobs.sqlite3"
    assert stat.S_IMODE((site.state_dir / "jobs").stat().st_mode) == 0o700
    if not site.database.url:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == 0
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
            assert db.execute("SELECT id, state FROM jobs").fetchall() == [(job.id, "queued")]
    else:
        assert not path.exists()  # nothing of the queue in SQLite
        with psycopg.connect(site.database.url, passfile=site.database.passfile) as conn:
            assert conn.execute("SELECT version_num FROM jobs.alembic_version").fetchall() == [("0001",)]
            assert conn.execute("SELECT id, state FROM jobs.jobs").fetchall() == [(job.id, "queued")]


def test_the_queue_survives_a_restart_and_marks_what_ran_as_failed(open_store):
    store = open_store()
    a = store.submit(username="alice", project="onc", dataset="bc", spec={"epochs": 1}, graph_sha256="f" * 64)
    b = store.submit(username="alice", project="onc", dataset="bc", spec={"epochs": 2}, graph_sha256="f" * 64)
    assert store.claim().id == a.id
    store.set_reservation(a.id, "r-1")
    store.close()  # the runner stops (as after kill -9: nothing more is written)
    store = open_store()
    (failed,) = store.recover()
    assert failed.id == a.id and failed.state == "failed" and failed.reason == STOPPED_MID_JOB
    assert failed.reservation == "r-1" and failed.spec == {"epochs": 1} and failed.finished >= failed.started
    assert store.get(b.id).state == "queued" and store.claim().id == b.id
    assert store.recover() == [store.get(b.id)]  # and b, claimed here, would be failed at the next start too
    assert store.counts() == {("onc", "failed"): 2} and store.oldest_queued() is None


def test_cancelling_a_queued_job_is_immediate_a_running_one_at_its_next_step(open_store):
    store = open_store()
    queued = store.submit(username="alice", project="onc", dataset="bc", spec={}, graph_sha256="f" * 64)
    running = store.submit(username="alice", project="onc", dataset="bc", spec={}, graph_sha256="f" * 64)
    assert store.oldest_queued() == queued.created
    assert store.cancel(queued.id, "alice").state == "cancelled"
    assert store.claim().id == running.id
    assert store.progress(running.id, {"step": 1}) is True
    with pytest.raises(JobError, match="another user's"):
        store.cancel(running.id, "bob")
    store.cancel(running.id, "alice")
    assert store.progress(running.id, {"step": 2}) is False  # the worker stops here
    assert store.finish(running.id, "cancelled", "cancelled at step 2").state == "cancelled"
    assert store.get(running.id).progress == {"step": 2}
    assert [j.id for j in store.of_user("alice")] == [running.id, queued.id] and store.of_user("bob") == []
    with pytest.raises(JobError, match="there is no job 'job-nope'"):
        store.get("job-nope")


def test_workers_of_two_runners_never_claim_the_same_job(open_store):
    """Writers are serialised by the database: 8 threads on two stores (two engines, as two processes would
    have) claim 40 jobs of ten accounts (4 each, the most one may have waiting), each exactly once."""
    stores = [open_store(), open_store()]
    submitted = {
        stores[0].submit(username=f"user{n % 10}", project="onc", dataset="bc", spec={"n": n}, graph_sha256="f" * 64).id
        for n in range(40)
    }
    claimed: list[list[str]] = [[] for _ in range(8)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            while (job := stores[i % 2].claim()) is not None:
                claimed[i].append(job.id)
        except BaseException as e:  # noqa: BLE001 -- reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    every = [job for mine in claimed for job in mine]
    assert sorted(every) == sorted(submitted)  # each once, none twice
    assert stores[1].counts() == {("onc", "running"): 40}


def _old_queue(path: Path) -> None:
    """A ``jobs.sqlite3`` as the store made it before migrations, with a job that was running and one queued."""
    legacy_schemas.make_sqlite(path, legacy_schemas.JOBS)
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO jobs (id, username, project, dataset, state, spec, graph_sha256, created, started, "
            "reservation) VALUES ('job-old', 'alice', 'onc', 'bc', 'running', '{\"epochs\": 3}', ?, 1.0, 2.0, 'r-9')",
            ("e" * 64,),
        )
        db.execute(
            "INSERT INTO jobs (id, username, project, dataset, state, spec, graph_sha256, created) "
            "VALUES ('job-waits', 'bob', 'onc', 'bc', 'queued', '{}', ?, 3.0)",
            ("e" * 64,),
        )


def test_a_queue_from_before_migrations_is_stamped_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "jobs" / "jobs.sqlite3"
    _old_queue(path)
    store = JobStore(tmp_path)
    (failed,) = store.recover()  # it was running when the old runner stopped
    assert (failed.id, failed.state, failed.reason) == ("job-old", "failed", STOPPED_MID_JOB)
    assert failed.spec == {"epochs": 3} and failed.reservation == "r-9" and failed.progress == {}
    assert store.claim().id == "job-waits"
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
        assert db.execute("SELECT id, state FROM jobs ORDER BY id").fetchall() == [
            ("job-old", "failed"),
            ("job-waits", "running"),
        ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = JobStore(tmp_path)  # opened again: simply at the newest revision
    assert store.get("job-old").state == "failed" and store.recover()[0].id == "job-waits"
    store.close()


def test_a_jobs_table_this_store_did_not_make_is_refused(tmp_path):
    path = tmp_path / "jobs" / "jobs.sqlite3"
    legacy_schemas.make_sqlite(path, "CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL)")
    with pytest.raises(DatabaseError, match="table jobs has columns id, state, not the .* restore it from a backup"):
        JobStore(tmp_path)
    with sqlite3.connect(path) as db:  # left as it was
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'alembic_version'").fetchall() == []


def test_a_requeued_job_waits_as_it_was_and_a_cancel_in_between_ends_it(open_store):
    """What the runner does with a job whose start the audit trail could not record (both databases)."""
    store = open_store()
    first = store.submit(username="alice", project="onc", dataset="bc", spec={}, graph_sha256="f" * 64)
    second = store.submit(username="alice", project="onc", dataset="bc", spec={}, graph_sha256="f" * 64)
    assert store.claim().id == first.id
    back = store.requeue(first.id, "waiting for the trail")
    assert (back.state, back.reason, back.started, back.finished) == ("queued", "waiting for the trail", None, None)
    claimed = store.claim()
    assert claimed.id == first.id and claimed.reason == ""  # the oldest again, and its wait is over
    store.cancel(first.id, "alice")  # while the worker holds it
    ended = store.requeue(first.id, "waiting for the trail")
    assert (ended.state, ended.reason) == ("cancelled", "cancelled before it started") and ended.finished
    assert store.claim().id == second.id and store.requeue(first.id, "x").state == "cancelled"


def test_odd_arrangements_get_a_clear_error_or_work(tmp_path):
    from paitient.rules.jobspec import canonical_preprocessing

    frame = pd.DataFrame({"age": [float(i) for i in range(60)], "grade": [1, 2, 3] * 20, "target": [0, 1] * 30})
    published = _publish_like(frame, tmp_path / "graded" / "versions" / "1")
    both = check_request({**BASE, "features": ["age", "grade"], "preprocessing": [
        {"op": "standardise", "columns": ["grade"]}, {"op": "onehot", "column": "grade"}]})  # fmt: skip
    with pytest.raises(SpecError, match="'grade' is both standardised and one-hot encoded"):
        prepare(published, both, split_seed=1)
    # A one-hot of a number column that is a default feature: expanded once.
    default = check_request({**BASE, "preprocessing": [{"op": "onehot", "column": "grade"}]})
    assert prepare(published, default, split_seed=1).features == ["age", "grade=1", "grade=2", "grade=3"]
    with pytest.raises(SpecError, match="constants are not resolved yet"):
        canonical_preprocessing([{"op": "standardise", "columns": ["age"], "from": "catalogue"}], ["age"])
    with pytest.raises(SpecError, match="holdout must have at most 2 significant digits .*give 0.23 instead of 0.2345"):
        check_request({**BASE, "holdout": 0.2345})
    assert check_request({**BASE, "holdout": 0.25})["holdout"] == 0.25
