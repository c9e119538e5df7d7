"""The checks with only part of their context: what they cannot check is reported for a steward, never raised."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save

from paitient.services.airlock.checks import CheckContext, run_checks
from paitient.services.airlock.store import Request

TABLE = b"sex,n\nf,40\nm,45\n"
RECIPE = {"dataset": "breast_cancer", "index": ["sex"], "aggfunc": "count"}
MODEL = {"source": "class Model: ...", "target": "target", "dataset": "breast_cancer"}


def request(kind: str, data: bytes, meta: dict) -> Request:
    return Request(
        id="r1",
        project="oncology",
        username="alice",
        account="pt-alice",
        uid=1000,
        kind=kind,
        filename="out.csv" if kind == "table" else "model.safetensors",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        justification="for the paper",
        meta=meta,
        state="checking",
        created=0.0,
        updated=0.0,
    )


def test_a_recipe_is_reported_unchecked_without_the_published_datasets():
    results = run_checks(request("table", TABLE, {"recipe": RECIPE}), TABLE, CheckContext())
    by = {r["check"]: r for r in results}
    assert by["recipe"]["status"] == "error"
    assert by["recipe"]["reason"] == (
        "the checks were given no way to read the published datasets, so they cannot check the recipe; "
        "a steward checks it by hand"
    )
    assert by["minimum_count"]["status"] == "pass"  # the checks of the table alone still ran


def test_weights_are_reported_unchecked_without_the_ledger_or_the_published_datasets():
    data = save(torch.nn.Linear(3, 2).state_dict())
    asked = []
    ctx = CheckContext(lookup_run=lambda sha: asked.append(sha))  # a ledger lookup, but no budgets
    by = {r["check"]: r for r in run_checks(request("weights", data, {"model": MODEL}), data, ctx)}
    assert by["format"]["status"] == "pass"
    assert by["training_record"]["status"] == "error" and asked == []
    assert "(the privacy ledger is not configured)" in by["training_record"]["reason"]
    assert by["membership_inference"]["status"] == "error"
    assert by["membership_inference"]["reason"] == (
        "the checks were given no way to read the published datasets, so they cannot run the audit; "
        "a steward checks by hand"
    )


@pytest.mark.parametrize(
    ("metrics", "status"),
    [
        ({"mia_loss": 0.03, "mia_loss_low": 0.0, "mia_calibrated": 0.05, "mia_calibrated_low": 0.01}, "pass"),
        ({"mia_loss": 0.13, "mia_loss_low": 0.04, "mia_calibrated": 0.05, "mia_calibrated_low": 0.01}, "review"),
        ({"mia_loss": 0.3, "mia_loss_low": 0.22, "mia_calibrated": 0.05, "mia_calibrated_low": 0.01}, "fail"),
        ({"test_accuracy": 0.9}, "fail"),
    ],
)
def test_the_runners_audit_is_judged_with_its_interval(metrics, status):
    from paitient.services.airlock.checks import _runner_audit

    assert _runner_audit(metrics, 0.1)["status"] == status


def test_weights_trained_in_a_kernel_are_labelled_self_reported():
    data = save(torch.nn.Linear(3, 2).state_dict())
    by = {r["check"]: r for r in run_checks(request("weights", data, {"model": MODEL}), data, CheckContext())}
    assert by["certified"]["status"] == "review"
    assert by["certified"]["reason"].startswith("self-reported, not certified")


def test_a_job_request_without_the_runners_key_or_with_another_record_fails():
    data = save(torch.nn.Linear(3, 2).state_dict())
    req = request("weights", data, {"job": "job-abc123", "record": {"format": "x"}})
    by = {r["check"]: r for r in run_checks(req, data, CheckContext())}
    assert by["certified"]["status"] == "fail" and "public key is not configured" in by["certified"]["reason"]
