"""A job request checked field by field, the rows it trains on, and the queue that survives a crash."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from paitient.rules.jobspec import SpecError, check_request
from paitient.services.jobs.data import prepare
from paitient.services.jobs.store import STOPPED_MID_JOB, JobError, JobStore

BASE = {"dataset": "breast_cancer", "target": "target", "epochs": 5, "batch_size": 64, "max_grad_norm": 1.0,
        "target_epsilon": 1.0}  # fmt: skip


def test_a_request_gets_its_defaults():
    spec = check_request(BASE)
    assert spec["loss"] == "cross_entropy" and spec["optimizer"] == "sgd" and spec["features"] is None
    assert (spec["lr"], spec["holdout"], spec["preprocessing"], spec["project"]) == (0.1, 0.2, [], None)
    assert spec["checkpoint"] is None  # the runner's own initialisation
    assert check_request({**BASE, "checkpoint": "mlp-public"})["checkpoint"] == "mlp-public"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "epochs must be a whole number from 1 to 1000"),
        ({"epochs": 2.5}, "epochs must be a whole number"),
        ({"target_epsilon": math.inf}, "target_epsilon must be a number"),
        ({"target_epsilon": None}, "target_epsilon is required"),
        ({"loss": "hinge"}, "loss must be one of cross_entropy, bce_with_logits, mse"),
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


def test_rows_are_preprocessed_as_declared_and_split_by_the_runners_seed(data_file):
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
    with pytest.raises(SpecError, match="site are not numbers; one-hot encode them"):
        prepare(data_file, check_request({**BASE, "features": ["age", "site"]}), split_seed=1)
    with pytest.raises(SpecError, match="has no column 'outcome'"):
        prepare(data_file, check_request({**BASE, "target": "outcome"}), split_seed=1)


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
        "mean": pytest.approx(25.2),
        "std": pytest.approx(np.std([20, 22, 26, 28, 30], ddof=1)),
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
    mean, std = float(frame["age"].mean()), float(frame["age"].std())
    assert p.preprocessing == [
        {"op": "standardise", "columns": ["age"], "mean": [pytest.approx(mean)], "std": [pytest.approx(std)],
         "from": "catalogue"},
        {"op": "onehot", "column": "site", "categories": ["a", "b"], "from": "catalogue"},
    ]  # fmt: skip
    assert p.features == ["age", "site=a", "site=b"]
    everything = np.concatenate([p.x_train, p.x_holdout])
    assert everything[:, 0].mean() == pytest.approx(0, abs=1e-5) and everything[:, 0].std(ddof=1) == pytest.approx(
        1, rel=1e-4
    )


def test_a_catalogue_without_the_statistic_says_what_to_give_instead(tmp_path, data_file):
    frame = pd.DataFrame(
        {"age": [float(i) for i in range(40)], "code": [str(i) for i in range(40)], "target": [0, 1] * 20}
    )
    published = _publish_like(frame, tmp_path / "cohort" / "versions" / "2")
    onehot = check_request({**BASE, "preprocessing": [{"op": "onehot", "column": "code"}]})
    with pytest.raises(
        SpecError, match=r"catalogue of cohort version 2 lists no categories for code .*give categories="
    ):
        prepare(published, onehot, split_seed=1)
    standardise = check_request({**BASE, "preprocessing": [{"op": "standardise", "columns": ["age"]}]})
    with pytest.raises(SpecError, match=r"no mean and spread for age .*give mean= and std="):
        prepare(data_file, standardise, split_seed=1)  # a version with no manifest at all


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


def test_the_queue_survives_a_restart_and_marks_what_ran_as_failed(tmp_path):
    store = JobStore(tmp_path)
    a = store.submit(username="alice", project="onc", dataset="bc", spec={"epochs": 1}, graph_sha256="f" * 64)
    b = store.submit(username="alice", project="onc", dataset="bc", spec={"epochs": 2}, graph_sha256="f" * 64)
    assert store.claim().id == a.id
    store.close()  # the runner stops (as after kill -9: nothing more is written)
    store = JobStore(tmp_path)
    (failed,) = store.recover()
    assert failed.id == a.id and failed.state == "failed" and failed.reason == STOPPED_MID_JOB
    assert store.get(b.id).state == "queued" and store.claim().id == b.id


def test_cancelling_a_queued_job_is_immediate_a_running_one_at_its_next_step(tmp_path):
    store = JobStore(tmp_path)
    queued = store.submit(username="alice", project="onc", dataset="bc", spec={}, graph_sha256="f" * 64)
    running = store.submit(username="alice", project="onc", dataset="bc", spec={}, graph_sha256="f" * 64)
    assert store.cancel(queued.id, "alice").state == "cancelled"
    assert store.claim().id == running.id
    assert store.progress(running.id, {"step": 1}) is True
    with pytest.raises(JobError, match="another user's"):
        store.cancel(running.id, "bob")
    store.cancel(running.id, "alice")
    assert store.progress(running.id, {"step": 2}) is False  # the worker stops here
    assert store.finish(running.id, "cancelled", "cancelled at step 2").state == "cancelled"
