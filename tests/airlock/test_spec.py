"""RequestSpec: what a request asks for, checked before the file is opened; and the service checks again."""

from __future__ import annotations

import os
import typing

import numpy as np
import pytest

from paitient.channel import ChannelError, call
from paitient.kernel.airlock import (
    AirlockError,
    HoldoutSplit,
    ModelSpec,
    RequestSpec,
    RequestSpecError,
    TableRecipe,
    TrainRows,
    request,
)
from paitient.kernel.airlock.spec import Aggfunc, request_spec
from paitient.rules.disclosure import AGGFUNCS
from tests.airlock.helpers import GOOD, register, wait_state

MODEL = "import torch\nclass Model(torch.nn.Module):\n    def __init__(self, d):\n        super().__init__()\n"


@pytest.fixture
def root_user(registry, monkeypatch, site):
    """In this process the caller is root: register uid 0 as a researcher of two projects."""
    register(registry, "rooty", 0, projects=["oncology", "cardio"])
    monkeypatch.setenv("PAITIENT_RUN_DIR", str(site.run_dir))


def test_the_keyword_form_sends_what_it_always_sent():
    spec = request_spec(
        kind="weights",
        justification="for external validation",
        project="oncology",
        model_source=MODEL,
        model_kwargs={"d": 3},
        target="target",
        features=["a", "b"],
        loss="bce",
        split={"holdout": 0.25, "seed": 7},
        preprocess="standardize",
        dataset="breast_cancer",
        supersedes="r-1",
    )
    assert spec.to_wire("model.safetensors") == {
        "kind": "weights",
        "justification": "for external validation",
        "filename": "model.safetensors",
        "project": "oncology",
        "supersedes": "r-1",
        "model": {
            "source": MODEL,
            "class": "Model",
            "kwargs": {"d": 3},
            "target": "target",
            "features": ["a", "b"],
            "loss": "bce",
            "split": {"holdout": 0.25, "seed": 7},
            "preprocess": "standardize",
            "dataset": "breast_cancer",
        },
    }
    plain = request_spec(kind="figure", justification="Figure 2")
    assert plain.to_wire("f.png") == {"kind": "figure", "justification": "Figure 2", "filename": "f.png"}


def test_a_table_recipe_is_normalised_and_spells_out_its_aggregation():
    spec = request_spec(
        kind="table",
        justification="Table 2",
        recipe={"dataset": "breast_cancer", "index": "age", "values": "mean radius"},
    )
    assert spec.recipe == TableRecipe(dataset="breast_cancer", index=("age",), values="mean radius")
    assert spec.to_wire("t.csv")["recipe"] == {
        "dataset": "breast_cancer",
        "index": ["age"],
        "columns": [],
        "values": "mean radius",
        "aggfunc": "mean",
    }
    counts = TableRecipe(dataset="breast_cancer", index=["age"], columns=["target"], version=2)
    assert counts.resolved_aggfunc == "count" and counts.to_wire()["version"] == 2
    assert set(typing.get_args(Aggfunc)) == set(AGGFUNCS)  # the spec offers exactly what the rules check


def test_splits_and_models_made_from_values():
    rows = TrainRows(np.array([0, 2, 5]))
    assert rows.rows == (0, 2, 5) and all(type(r) is int for r in rows.rows)
    assert rows.to_wire() == {"train_rows": [0, 2, 5]}
    assert HoldoutSplit(holdout=np.float32(0.5), seed=np.int64(3)).to_wire() == {"holdout": 0.5, "seed": 3}
    model = ModelSpec(source=MODEL, target="target", split={"train_rows": [1, 2]})  # a dict split is read
    assert model.split == TrainRows([1, 2]) and model.to_wire()["split"] == {"train_rows": [1, 2]}

    class Net:  # defined in this file: the file's source travels
        pass

    spec = ModelSpec.from_class(Net, target="target", split=HoldoutSplit())
    assert spec.class_name == "Net" and "class Net:" in spec.source


LONG = "x" * 10_001


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"kind": "report"}, "kind must be one of table, figure, weights, other; got 'report'"),
        ({"justification": "  "}, "say why this output should leave the workspace: justification='...'"),
        ({"justification": LONG}, "the justification is longer than 10000 characters"),
        ({"project": ""}, "project must be a project's name, or be left out, got ''"),
        ({"supersedes": ""}, "supersedes must be the id of an earlier request, got ''"),
        (
            {"kind": "figure", "recipe": {"dataset": "d", "index": ["a"]}},
            "a recipe (dict) goes with kind='table' only; this request is kind='figure'",
        ),
        ({"recipe": {"dataset": "d", "index": ["a"], "rows": 3}}, "unknown recipe keys ['rows']"),
        ({"recipe": {"dataset": "d", "index": 3}}, "recipe 'index' must be a column name or a list of column names"),
        ({"recipe": {"dataset": "d", "index": []}}, "the recipe needs at least one 'index' column"),
        ({"recipe": {"index": ["a"]}}, "the recipe needs 'dataset': the name of one of the project's datasets"),
        (
            {"recipe": {"dataset": "d", "index": ["a"], "values": "v", "aggfunc": "count"}},
            "a count table has no 'values'; any other aggfunc needs 'values'",
        ),
        (
            {"recipe": {"dataset": "d", "index": ["a"], "values": "v", "aggfunc": "mode"}},
            "recipe aggfunc 'mode' is not supported; use one of count, mean, sum, median, std, min, max",
        ),
        (
            {"recipe": {"dataset": "d", "index": ["a"], "version": 0}},
            "recipe 'version' must be a dataset version (1, 2, ...), got 0",
        ),
        (
            {"model_source": MODEL, "target": "y", "split": {"holdout": 0.3}},
            "model_source= goes with kind='weights' only; this request is kind='table'",
        ),
        (
            {"kind": "weights", "target": "y", "split": {"holdout": 0.3}},
            "target, split: these describe the model for the audit; give model_source= too (the model class)",
        ),
        (
            {"kind": "weights", "model_source": MODEL, "target": "y"},
            'split= must declare the training rows: {"holdout": 0.3, "seed": 0} or {"train_rows": [...]}',
        ),
    ],
)
def test_a_request_the_airlock_would_refuse_is_refused_with_what_to_change(keywords, message):
    with pytest.raises(RequestSpecError) as e:
        request_spec(**{"kind": "table", "justification": "Table 1", **keywords})
    assert str(e.value).startswith(message), str(e.value)


WEIGHTS = {"kind": "weights", "justification": "j", "model_source": MODEL, "target": "y", "split": {"holdout": 0.3}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target": None}, "target= must name the column the model predicts (the audit computes its loss), got None"),
        ({"split": {"holdout": 1.5}}, "split holdout must be a fraction between 0 and 1 (e.g. 0.3), got 1.5"),
        ({"split": {"holdout": 0.3, "seed": 1.5}}, "split seed must be a whole number, got 1.5"),
        ({"split": {"rows": [1]}}, 'declare the split as {"holdout": 0.3, "seed": 0} or {"train_rows": [...]}'),
        ({"split": {"train_rows": [3, -1]}}, "train_rows must be row positions: whole numbers >= 0"),
        ({"split": {"train_rows": []}}, "train_rows is empty; list the rows the model was trained on"),
        ({"loss": "hinge"}, "loss must be one of cross_entropy, bce, mse; got 'hinge'"),
        ({"preprocess": "minmax"}, "preprocess must be one of none, standardize; got 'minmax'"),
        ({"model_kwargs": {"d": object()}}, "model_kwargs must hold JSON values (numbers, strings, lists, dicts)"),
        ({"model_kwargs": {"d": float("nan")}}, "model_kwargs must hold JSON values (numbers, strings, lists, dicts)"),
        ({"model_class": "my model"}, "model_class must be the name of a class, got 'my model'"),
        ({"features": "age"}, "features must be a list of column names, got 'age'"),
        ({"model_source": ""}, "model_source must be the model class, or its Python source as a string"),
        ({"model_source": "#" * 200_001}, "the model source is longer than 200000 characters"),
        ({"dataset": ""}, "dataset must be a dataset's name, got ''"),
    ],
)
def test_a_model_description_the_audit_cannot_use_is_refused(change, message):
    with pytest.raises(RequestSpecError) as e:
        request_spec(**{**WEIGHTS, **change})
    assert str(e.value).startswith(message), str(e.value)


def test_a_spec_is_sent_as_it_is_and_checked_before_the_file_is_opened(channel, airlock, root_user, tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(GOOD)
    spec = RequestSpec(
        kind="table",
        justification="cohort table",
        project="cardio",
        recipe=TableRecipe(dataset="diabetes", index=["stage"]),
    )
    rid = request(path, spec, confirm=True)  # the recipe's dataset is not published: its check fails
    wait_state(airlock, rid, "in_review")
    stored = airlock.store.get(rid)
    assert (stored.kind, stored.project, stored.justification) == ("table", "cardio", "cohort table")
    assert stored.meta["recipe"] == spec.recipe.to_wire()
    with pytest.raises(AirlockError, match="give a RequestSpec or the request's keyword arguments, not both"):
        request(path, spec, project="oncology")
    # a bad request is refused before the file is looked at: this path does not exist
    with pytest.raises(AirlockError, match="kind must be one of table, figure, weights, other; got 'report'"):
        request(tmp_path / "absent.csv", kind="report", justification="x")
    with pytest.raises(AirlockError, match="say what the file is: kind= one of table, figure, weights, other"):
        request(path, justification="x")
    with pytest.raises(
        AirlockError, match=r"unknown keyword argument\(s\) justfication, projekt; a request takes kind, "
    ):
        request(path, kind="table", justification="x", justfication="typo", projekt="oncology")  # type: ignore[call-overload]
    assert [r.id for r in airlock.store.list()] == [rid]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"kind": "report", "justification": "x"}, "kind must be one of"),
        ({"kind": "table", "justification": " "}, "say why this output should leave the workspace"),
        ({"kind": "table", "justification": LONG}, "the justification is longer than 10000 characters"),
        ({"kind": "figure", "justification": "x", "recipe": {"a": 1}}, "recipe (dict) goes with kind='table' only"),
        ({"kind": "table", "justification": "x", "model": {"source": "x"}}, "goes with kind='weights' only"),
        ({"kind": "weights", "justification": "x", "model": "class M: pass"}, "goes with kind='weights' only"),
        ({"kind": "table", "justification": "x", "project": "registry"}, "not a member of project 'registry'"),
    ],
)
def test_the_service_checks_what_a_kernel_sends_without_the_spec(channel, airlock, root_user, tmp_path, args, message):
    """The kernel is untrusted: code in it can write to the socket directly, past every check above."""
    path = tmp_path / "t.csv"
    path.write_bytes(GOOD)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ChannelError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            call(channel.path, "request", {"project": "cardio", "filename": "t.csv", **args}, fds=[fd])
    finally:
        os.close(fd)
    assert e.value.code in ("bad_request", "forbidden")
    assert airlock.store.list() == []


def test_a_table_may_ask_for_xlsx_and_nothing_else_may():
    spec = request_spec(kind="table", justification="Table 1", format="xlsx")
    assert spec.to_wire("t.csv") == {"kind": "table", "justification": "Table 1", "filename": "t.csv", "format": "xlsx"}
    with pytest.raises(RequestSpecError, match="format= goes with kind='table' only; this request is kind='figure'"):
        request_spec(kind="figure", justification="Figure 2", format="xlsx")
    with pytest.raises(RequestSpecError, match="format must be one of csv, xlsx; got 'ods'"):
        request_spec(kind="table", justification="Table 1", format="ods")  # type: ignore[typeddict-item]
