"""What a browser that is not a reviewer's may be sent about a request. Pure.

The requester's browser (and a colleague's) is outside the workspace: every byte the airlock's pages send it
leaves. Before release they get the request's state, the checks' outcomes, the reviewers' decisions and the
file's name, size and hash, and nothing of the upload's content:

- the justification the researcher typed comes back capped at :data:`SHOWN_JUSTIFICATION` characters;
- a check's details keep numbers only (thresholds, counts, scores); lists (which cells, which columns) become
  their length, text is left out, so no cell value and no column name of the table is quoted;
- a check whose reason can carry a parser's message about the file (:data:`PARSER_CHECKS`) gets a fixed
  reason instead, and every other reason is capped at :data:`SHOWN_REASON` characters.

Inside the workspace, ``paitient.kernel.airlock.status(id)`` still gives the researcher every detail: the
kernel holds the file already.
"""

from __future__ import annotations

import json
from typing import Any

SHOWN_JUSTIFICATION = 300
"""Characters of the requester's own justification shown back to their browser."""
SHOWN_REASON = 300
"""Characters of a check's reason shown to a browser that is not a reviewer's."""

PARSER_CHECKS = {
    "readable": "the file could not be read as a table (UTF-8 CSV, TSV or Parquet); "
    "airlock.status(id) in your notebook gives the parser's message",
    "format": "the file is not a valid safetensors file; airlock.status(id) in your notebook says why",
    "image": "the file is not an image the airlock can show as it is; airlock.status(id) in your notebook says why",
}
"""Checks whose reason can quote what a parser found in the file, with what a requester's browser gets instead
(when they do not pass)."""


def cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown_justification(text: str) -> str:
    if len(text) <= SHOWN_JUSTIFICATION:
        return text
    return cap(text, SHOWN_JUSTIFICATION) + f" ({len(text)} characters; the reviewers read all of it)"


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


def requester_check(check: dict[str, Any]) -> dict[str, Any]:
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


def requester_info(info: dict[str, Any]) -> dict[str, Any]:
    """:meth:`Airlock.describe` of a request, cut down to what the requester's browser may get."""
    return {
        **info,
        "justification": shown_justification(str(info.get("justification", ""))),
        "checks": [requester_check(c) for c in info.get("checks", [])],
    }


def public_for(req: Any, *, reviewer: bool) -> dict[str, Any]:
    """A request's listing entry: whole for its reviewers, the justification capped for anyone else."""
    out = req.public()
    if not reviewer:
        out["justification"] = shown_justification(out["justification"])
    return out


CERTIFIED_FACTS: tuple[tuple[str, str], ...] = (
    ("job_id", "Training job"),
    ("project", "Project"),
    ("dataset", "Dataset"),
    ("dataset_version", "Dataset version"),
    ("dataset_sha256", "SHA-256 of the dataset version read"),
    ("n_train", "Rows trained on"),
    ("n_holdout", "Rows held out (never trained on)"),
    ("target", "Target column"),
    ("features", "Feature columns"),
    ("preprocessing", "Preprocessing (declared steps)"),
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
"""The facts of a signed training record, in the order a steward reads them, with their labels."""


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
