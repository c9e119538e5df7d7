"""What a browser that is not a reviewer's may be sent about a request. Pure.

The requester's browser (and a colleague's) is outside the workspace: every byte the airlock's pages send it
leaves. What the researcher's kernel wrote into a request (the file, its name, the justification, the recipe
or model it came with) reaches a check's reason and details, so none of it goes to such a browser. Before
release it gets the request's id, project, kind and state, its size to two digits and its times to the
minute, the reviewers' decisions, and for each check its name, its outcome and a fixed sentence saying what
the check looks at (:data:`CHECKS`); see :func:`shown_request`:

- the justification becomes its length, to two digits (:func:`shown_justification`);
- the file's name and SHA-256 are shown once the file is released (a steward released it with that name, or
  the airlock released its own table under the request's id), and before that fixed placeholders
  (:data:`UNNAMED`, :data:`UNHASHED`);
- what is left (the outcomes, the rounded size and times) is a few dozen bits a request, and a researcher
  files at most [airlock] requests_per_day requests in any 24 hours;
- a check's reason and details stay in the workspace: ``paitient.kernel.airlock.status(id)`` in the
  notebook gives every one of them (the kernel holds the file already, and what it displays passes the
  egress gate).

What ``airlock.check`` hands the caller's kernel to display is :func:`notebook_check`: the reason capped, a
parser's message about the file replaced, numbers only in the details.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from paitient.rules import review

SHOWN_REASON = 300
"""Characters of a check's reason in what ``airlock.check`` hands the kernel to display."""

UNNAMED = "(named once released; airlock.status(id) in your notebook gives the name)"
"""The file name a browser that is not a reviewer's sees before the file is released."""

CHECKS = {
    "published_copy": "the file is not a copy of a published dataset file",
    "row_level": "the table is not row-level data of the project's datasets",
    "labels": "every label of the table is a catalogued category, a column name or one of the project's labels",
    "row_content": "the table reveals no row of the project's datasets",
    "readable": "the file reads as a table (UTF-8 CSV, TSV or Parquet)",
    "recipe": "the table's recipe recomputes exactly its numbers from the dataset",
    "minimum_count": "every count is at least the project's minimum",
    "zeros": "no zero cell discloses that nobody has an attribute",
    "dominance": "no cell is dominated by a few of the people behind it",
    "p_ratio": "no one's value can be estimated closely from a cell",
    "missing": "no cell is missing",
    "negative": "no cell is negative",
    "differencing": "no difference with the project's earlier tables counts a small group",
    "format": "the file is a valid safetensors file",
    "certified": "the weights carry the training runner's signed record",
    "training_record": "the privacy ledger holds a matching training record within the project's budget",
    "membership_inference": "the membership-inference audit finds no leak beyond the project's threshold",
    "policy": "the project's policy allows this kind of output",
    "image": "the file is an image the airlock shows as pixels only",
    "manual_review": "a steward reviews the output by hand",
    "canonical": "the airlock stores and releases the file in its own re-encoding",
    "internal": "the automatic checks ran",
}
"""What each check looks at, in the words a requester's browser gets instead of its reason."""

OUTCOMES = {
    "pass": "passed",
    "fail": "failed",
    "review": "left to a steward's judgement",
    "error": "could not run; a steward checks by hand",
}

PARSER_CHECKS = {
    "readable": "the file could not be read as a table (UTF-8 CSV, TSV or Parquet); "
    "airlock.status(id) in your notebook gives the parser's message",
    "format": "the file is not a valid safetensors file; airlock.status(id) in your notebook says why",
    "image": "the file is not an image the airlock can show as it is; airlock.status(id) in your notebook says why",
}
"""Checks whose reason can quote what a parser found in the file, with what the kernel is handed to display
instead (when they do not pass)."""


def cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown_justification(text: str) -> str:
    """The justification as a browser that is not a reviewer's gets it: its length only."""
    return f"(about {rounded_size(len(text))} characters; the reviewers read all of it, and your notebook has it)"


UNHASHED = "(shown once released; airlock.status(id) in your notebook gives it)"
"""The SHA-256 a browser that is not a reviewer's sees before the file is released."""


def rounded_size(size: int) -> int:
    """A size to two significant digits: what a browser that is not a reviewer's gets before release (the
    kernel chose the file, so its exact size is some thirty bits of its choice)."""
    return int(float(f"{size:.2g}")) if size >= 100 else size


def minute(ts: float) -> float:
    """A time to the whole minute below it (the kernel chose when it filed, and the checks' run time)."""
    return float(int(ts // 60) * 60)


def shown_request(public: dict[str, Any]) -> dict[str, Any]:
    """A request's fields (:meth:`Request.public`, or an answer built on it) as a browser that is not a
    reviewer's gets them: the justification as its length; before release the file's name and SHA-256 as
    placeholders and its size to two digits; the times to the minute, and the decisions' too."""
    out = {**public, "justification": shown_justification(str(public.get("justification", "")))}
    if out.get("state") != review.RELEASED:
        out.update(filename=UNNAMED, sha256=UNHASHED, size=rounded_size(int(out.get("size") or 0)))
    for key in ("created", "updated"):
        if isinstance(out.get(key), int | float):
            out[key] = minute(out[key])
    if isinstance(out.get("decisions"), list):
        out["decisions"] = [{**d, "ts": minute(d["ts"])} if "ts" in d else d for d in out["decisions"]]
    return out


def numbers_only(details: Any) -> dict[str, Any]:
    """Numbers and booleans of a check's details, recursively; a list becomes ``<key>_count``."""
    out: dict[str, Any] = {}
    for key, value in (details or {}).items() if isinstance(details, dict) else ():
        key = str(key)
        if isinstance(value, bool | int | float):
            out[key] = value
        elif isinstance(value, dict):
            out[key] = numbers_only(value)
        elif isinstance(value, list | tuple):
            out[f"{key}_count"] = len(value)
    return out


def notebook_check(check: dict[str, Any]) -> dict[str, Any]:
    """A check as ``airlock.check`` hands it to the caller's kernel to display (kernel output, under the gate)."""
    name, status = str(check.get("check", "")), str(check.get("status", ""))
    reason = str(check.get("reason", ""))
    if name in PARSER_CHECKS and status != "pass":
        reason = PARSER_CHECKS[name]
    return {
        "check": name,
        "status": status,
        "reason": cap(reason, SHOWN_REASON),
        "details": numbers_only(check.get("details")),
    }


def requester_check(check: dict[str, Any]) -> dict[str, Any]:
    """A check as a browser that is not a reviewer's gets it: its name, its outcome and what it looks at."""
    name, status = str(check.get("check", "")), str(check.get("status", ""))
    known = name if name in CHECKS else "internal"
    outcome = OUTCOMES.get(status, "unknown")
    return {
        "check": known,
        "status": status if status in OUTCOMES else "error",
        "reason": f"{CHECKS[known]}: {outcome}"
        + ("" if status == "pass" else "; airlock.status(id) in your notebook says why"),
        "details": {},
    }


def requester_info(info: dict[str, Any]) -> dict[str, Any]:
    """:meth:`Airlock.describe` of a request, cut down to what a browser that is not a reviewer's may get."""
    return {**shown_request(info), "checks": [requester_check(c) for c in info.get("checks", [])]}


def public_for(req: Any, *, reviewer: bool) -> dict[str, Any]:
    """A request's listing entry: whole for its reviewers, :func:`shown_request` for anyone else."""
    return req.public() if reviewer else shown_request(req.public())


CERTIFIED_FACTS: tuple[tuple[str, str], ...] = (
    ("job_id", "Training job"),
    ("project", "Project"),
    ("dataset", "Dataset (the researcher's choice)"),
    ("dataset_version", "Dataset version"),
    ("dataset_sha256", "SHA-256 of the dataset version read"),
    ("n_train", "Rows trained on"),
    ("n_holdout", "Rows held out (never trained on)"),
    ("target", "Target column (the researcher's choice)"),
    ("features", "Feature columns (the researcher's choice)"),
    ("preprocessing", "Preprocessing (the researcher's declared steps and constants, applied as declared)"),
    ("graph_sha256", "SHA-256 of the model graph executed"),
    ("initialisation", "Initial parameters"),
    ("sampling_rate", "Poisson sampling rate"),
    ("noise_multiplier", "Noise multiplier"),
    ("max_grad_norm", "Clipping bound (per-sample gradient norm)"),
    ("steps", "Optimiser steps"),
    ("epsilon", "Epsilon spent (the runner's accountant)"),
    ("delta", "Delta"),
    ("accountant", "Accountant"),
    ("weights_sha256", "SHA-256 of the weights file"),
    ("metrics", "Metrics on the held-out rows"),
    ("runner_version", "Runner version"),
    ("finished", "Finished (UTC)"),
)
"""The facts of a signed training record, in the order a steward reads them, with their labels. The runner
computed every fact but those labelled as the researcher's: those it checked for their form (a column of the
dataset, a finite number) and applied, and they leave with the record as the researcher wrote them."""


@dataclass(frozen=True)
class GraphListing:
    """The graph a training job trained, as the runner listed it, for a reviewer's page."""

    lines: tuple[str, ...]
    numbers: tuple[float, ...]
    """Every distinct number its operations compute with (:func:`paitient.services.jobs.graph.numbers`)."""
    error: str = ""

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The parameters' names: the researcher's text, kept in the released weights file."""
        return tuple(m.group(1) for line in self.lines if (m := _PARAMETER_LINE.match(line)))


_PARAMETER_LINE = re.compile(r"p\d+ = parameter (\S+) \[")


def graph_listing(stored: bytes) -> GraphListing:
    """The runner's listing of a graph as the airlock stored it (JSON: ``lines``, ``numbers``)."""
    doc = json.loads(stored)
    return GraphListing(tuple(str(x) for x in doc["lines"]), tuple(float(n) for n in doc["numbers"]))


def _fact_text(value: Any) -> str:
    if isinstance(value, dict) and set(value) == {"checkpoint", "name"}:
        return f"pretrained checkpoint {value['name']} from the operator's registry, SHA-256 {value['checkpoint']}"
    if isinstance(value, dict) and set(value) == {"scheme", "seed"}:
        return f"drawn by the runner: scheme {value['scheme']}, seed {value['seed']}"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    if isinstance(value, dict) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()):
        return "; ".join(f"{k} {v:.4g}" for k, v in sorted(value.items()))
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def certified_facts(checks: list[dict[str, Any]]) -> list[tuple[str, str]] | None:
    """The facts the training runner signed, for a reviewer's page: ``(label, text)`` pairs from the record of
    a passed ``certified`` check (checked by the airlock against the runner's public key), or ``None`` when
    no check certified the request."""
    details = next(
        (c.get("details") or {} for c in checks if c.get("check") == "certified" and c.get("status") == "pass"), None
    )
    record = (details or {}).get("record")
    if not isinstance(record, dict):
        return None
    facts = [(label, _fact_text(record[key])) for key, label in CERTIFIED_FACTS if key in record]
    if details and details.get("key_id"):
        facts.append(("Signed with the runner's key", str(details["key_id"])))
    return facts
