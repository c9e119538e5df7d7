"""The ingest spec: a TOML file that says, for one source table, what happens to every column.

    project = "oncology"
    dataset = "breast_cancer"
    source = "breast_cancer.csv"        # relative to the spec file
    patient_id = "mrn"                  # keys date shifts and k-anonymity counting
    quasi_identifiers = ["age", "postcode"]

    [columns]
    mrn = { action = "pseudonym", rename = "patient" }
    name = "drop"
    diagnosed = "date_shift"
    age = { action = "generalise", method = "age_band", width = 10, top = 90 }
    postcode = { action = "generalise", method = "prefix", length = 2 }
    radius = "keep"

Parsing checks the spec alone; :func:`check_against` checks it against the source's columns.
See docs/ingest.md for every key.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from paitient.config import NAME_RE
from paitient.services.data.errors import IngestRefused

ACTIONS = ("drop", "pseudonym", "date_shift", "generalise", "keep")
METHODS = ("age_band", "prefix", "rare", "year")
FORMATS = ("csv", "parquet", "fhir")
KEEP_TYPES = ("string", "int", "float", "bool", "date")

# parameters each action (or generalisation method) accepts, with their defaults
_PARAMS: dict[str, dict[str, Any]] = {
    "drop": {},
    "pseudonym": {"rename": "", "domain": "", "prefix": "P-"},
    "date_shift": {"rename": "", "format": ""},
    "keep": {"rename": "", "type": ""},
    "age_band": {"rename": "", "width": 10, "top": 90, "edges": []},
    "prefix": {"rename": "", "length": 2, "min_count": 0, "other": "other"},
    "rare": {"rename": "", "min_count": 10, "other": "other"},
    "year": {"rename": "", "width": 1, "format": ""},
}

_TOP_KEYS = {
    "project",
    "dataset",
    "source",
    "format",
    "encoding",
    "delimiter",
    "resource",
    "patient_id",
    "quasi_identifiers",
    "min_k",
    "strict",
    "description",
    "columns",
}


@dataclass(frozen=True)
class Rule:
    """What happens to one source column."""

    column: str
    action: str
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return self.params.get("rename") or self.column


@dataclass(frozen=True)
class Spec:
    project: str
    dataset: str
    source: Path
    format: str
    rules: dict[str, Rule]
    patient_id: str = ""
    quasi_identifiers: tuple[str, ...] = ()
    min_k: int = 0
    """0: the site's ``min_k``. A spec may raise it, never lower it."""
    strict: bool = True
    encoding: str = "utf-8"
    delimiter: str = ","
    resource: str = ""
    description: str = ""

    def digest(self, *, min_k: int, date_shift_days: int, date_shift_unit: str = "day", time_zone: str = "") -> str:
        """SHA-256 of everything that decides the output, except where the source lies."""
        d = asdict(self)
        for k in ("source", "description"):
            d.pop(k)
        d["rules"] = [asdict(r) for r in self.rules.values()]
        d["effective"] = {"min_k": max(min_k, self.min_k), "date_shift_days": date_shift_days}
        if date_shift_unit != "day":  # named only where it is not the default, so earlier digests still hold
            d["effective"]["date_shift_unit"] = date_shift_unit
        if time_zone:  # the same: a zone decides the output of a column of zoned times only
            d["effective"]["time_zone"] = time_zone
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def _rule(column: str, raw: Any, problems: list[str]) -> Rule | None:
    where = f"[columns] {column!r}"
    if isinstance(raw, str):
        raw = {"action": raw}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected an action name or a table with action = ..., got {raw!r}")
        return None
    raw = dict(raw)
    action = raw.pop("action", None)
    if action == "generalize":
        action = "generalise"
    if action not in ACTIONS:
        problems.append(f"{where}: unknown action {action!r}; actions: {', '.join(ACTIONS)}")
        return None
    method = ""
    key = action
    if action == "generalise":
        method = raw.pop("method", "")
        if method not in METHODS:
            problems.append(f"{where}: generalise needs method = one of {', '.join(METHODS)}, got {method!r}")
            return None
        key = method
    allowed = _PARAMS[key]
    params: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            problems.append(f"{where}: unknown key {name!r} for {key}; keys: {known}")
            continue
        default = allowed[name]
        ok = (
            isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            if isinstance(default, list)
            else isinstance(value, type(default)) and not isinstance(value, bool)
        )
        if not ok:
            problems.append(f"{where}: {name} must be {type(default).__name__}, got {value!r}")
            continue
        params[name] = value
    full = {**allowed, **params}
    if key == "age_band":
        if full["edges"]:
            e = full["edges"]
            if e != sorted(set(e)) or len(e) < 2:
                problems.append(f"{where}: edges must be at least two increasing numbers, got {e}")
        elif full["width"] < 1 or full["top"] < full["width"]:
            problems.append(f"{where}: width must be >= 1 and top >= width, got {full['width']}, {full['top']}")
    if key in ("prefix",) and full["length"] < 1:
        problems.append(f"{where}: length must be at least 1")
    if key == "year" and full["width"] < 1:
        problems.append(f"{where}: width must be at least 1")
    if key == "rare" and full["min_count"] < 2:
        problems.append(f"{where}: min_count must be at least 2 (categories seen fewer times become 'other')")
    if key == "keep" and full["type"] not in ("", *KEEP_TYPES):
        problems.append(f"{where}: type must be one of {', '.join(KEEP_TYPES)}, got {full['type']!r}")
    if action == "drop":
        full = {}
    return Rule(column=column, action=action, method=method, params=full)


def parse_spec(raw: dict[str, Any], base_dir: Path, source: str | Path | None = None) -> Spec:
    """Validate a parsed spec document; ``source`` overrides the spec's own ``source``."""
    problems: list[str] = []
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        problems.append(f"unknown key(s) {', '.join(sorted(unknown))}; keys: {', '.join(sorted(_TOP_KEYS))}")
    for required in ("project", "dataset", "columns"):
        if required not in raw:
            problems.append(f"missing key {required!r}")
    if source is None and "source" not in raw:
        problems.append("missing key 'source' (the table to ingest, relative to the spec file)")
    for name in ("project", "dataset"):
        v = raw.get(name, "x")
        if not isinstance(v, str) or not NAME_RE.match(v):
            problems.append(f"{name} = {v!r}: lower-case letters, digits, '-' or '_', starting with a letter")
    cols = raw.get("columns", {})
    rules: dict[str, Rule] = {}
    if not isinstance(cols, dict):
        problems.append("[columns] must be a table of column = action")
    else:
        for col, r in cols.items():
            rule = _rule(col, r, problems)
            if rule is not None:
                rules[col] = rule
    outputs: dict[str, str] = {}
    for r in rules.values():
        if r.action == "drop":
            continue
        if r.output in outputs:
            problems.append(f"[columns] {r.column!r} and {outputs[r.output]!r} both come out as {r.output!r}")
        outputs[r.output] = r.column
    src = Path(source if source is not None else raw.get("source", ""))
    if not src.is_absolute():
        src = base_dir / src
    fmt = raw.get("format") or {".csv": "csv", ".parquet": "parquet", ".ndjson": "fhir"}.get(src.suffix, "")
    if fmt not in FORMATS:
        problems.append(f"format = {fmt!r}: say format = one of {', '.join(FORMATS)} (source is {src.name})")
    pid = raw.get("patient_id", "")
    if pid:
        pr = rules.get(pid)
        if pr is None:
            problems.append(f"patient_id = {pid!r} is not in [columns]; declare it, as pseudonym or drop")
        elif pr.action not in ("pseudonym", "drop"):
            problems.append(f"patient_id = {pid!r} is a direct identifier: its action must be pseudonym or drop")
    for r in rules.values():
        if r.action == "date_shift" and not pid:
            problems.append(
                f"[columns] {r.column!r} is date_shift, which needs patient_id = <column> "
                "(each patient's dates move by that patient's own offset)"
            )
    qis = raw.get("quasi_identifiers", [])
    if not isinstance(qis, list) or not all(isinstance(q, str) for q in qis):
        problems.append(f"quasi_identifiers must be a list of column names, got {qis!r}")
        qis = []
    for q in qis:
        if q not in rules:
            problems.append(f"quasi_identifiers: {q!r} is not in [columns]; declare what happens to it")
        elif rules[q].action in ("drop", "pseudonym"):
            problems.append(
                f"quasi_identifiers: {q!r} is declared {rules[q].action}; keep or generalise a quasi-identifier"
            )
    min_k = raw.get("min_k", 0)
    if isinstance(min_k, bool) or not isinstance(min_k, int) or min_k < 0:
        problems.append(f"min_k must be a whole number, got {min_k!r}")
    strict = raw.get("strict", True)
    if not isinstance(strict, bool):
        problems.append(f"strict must be true or false, got {strict!r}")
    for name in ("encoding", "delimiter", "resource", "description"):
        if not isinstance(raw.get(name, ""), str):
            problems.append(f"{name} must be a string")
    if len(raw.get("delimiter", ",")) != 1:
        problems.append("delimiter must be one character")
    if problems:
        raise IngestRefused(problems)
    return Spec(
        project=raw["project"],
        dataset=raw["dataset"],
        source=src,
        format=fmt,
        rules=rules,
        patient_id=pid,
        quasi_identifiers=tuple(qis),
        min_k=min_k,
        strict=strict,
        encoding=raw.get("encoding", "utf-8"),
        delimiter=raw.get("delimiter", ","),
        resource=raw.get("resource", ""),
        description=raw.get("description", ""),
    )


def load_spec(path: str | Path, source: str | Path | None = None) -> Spec:
    """Read a spec file; errors name the file."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IngestRefused(f"spec {p} does not exist") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise IngestRefused(f"spec {p} is not valid TOML: {e}") from None
    try:
        return parse_spec(raw, p.parent.absolute(), source)
    except IngestRefused as e:
        raise IngestRefused([f"spec {p}: {q}" for q in e.problems]) from None


def check_against(spec: Spec, columns: list[str]) -> None:
    """Refuse a spec that names columns the source lacks."""
    missing = [c for c in spec.rules if c not in columns]
    if missing:
        raise IngestRefused(
            [f"[columns] {c!r} is not a column of the source; its columns are: {', '.join(columns)}" for c in missing]
        )
