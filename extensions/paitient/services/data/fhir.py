"""FHIR R4 NDJSON (bulk export) flattened to one table per resource type.

One resource per line. Each supported type becomes fixed columns (listed in :data:`COLUMNS` and in
docs/ingest.md); references to a patient become the patient's resource id in a ``patient`` column, so
every table of one export shares the identifier the spec pseudonymises. Codings take the first coding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from paitient.services.data.errors import IngestRefused

COLUMNS: dict[str, tuple[str, ...]] = {
    "Patient": (
        "id",
        "identifier",
        "family",
        "given",
        "gender",
        "birth_date",
        "deceased",
        "deceased_date",
        "phone",
        "email",
        "address_line",
        "city",
        "postal_code",
        "country",
    ),
    "Encounter": (
        "id",
        "identifier",
        "patient",
        "status",
        "class_code",
        "type_code",
        "type_display",
        "period_start",
        "period_end",
        "reason_code",
        "reason_display",
    ),
    "Condition": (
        "id",
        "patient",
        "encounter",
        "code_system",
        "code",
        "code_display",
        "clinical_status",
        "verification_status",
        "onset_date",
        "recorded_date",
    ),
    "Observation": (
        "id",
        "patient",
        "encounter",
        "status",
        "category",
        "code_system",
        "code",
        "code_display",
        "effective_date",
        "value_number",
        "value_unit",
        "value_text",
    ),
}


def _ref(obj: dict | None, kind: str) -> str | None:
    ref = (obj or {}).get("reference") or ""
    return ref.split("/", 1)[1] if ref.startswith(kind + "/") else (ref or None)


def _coding(concept: dict | None) -> dict:
    codings = (concept or {}).get("coding") or [{}]
    return codings[0] if isinstance(codings, list) and codings else {}


def _first(items: Any) -> dict:
    return items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}


def _telecom(r: dict, system: str) -> str | None:
    for t in r.get("telecom") or []:
        if isinstance(t, dict) and t.get("system") == system:
            return t.get("value")
    return None


def _patient(r: dict) -> dict:
    name, addr = _first(r.get("name")), _first(r.get("address"))
    deceased = r.get("deceasedBoolean")
    if deceased is None and r.get("deceasedDateTime"):
        deceased = True
    return {
        "id": r.get("id"),
        "identifier": _first(r.get("identifier")).get("value"),
        "family": name.get("family"),
        "given": " ".join(name.get("given") or []) or None,
        "gender": r.get("gender"),
        "birth_date": r.get("birthDate"),
        "deceased": deceased,
        "deceased_date": r.get("deceasedDateTime"),
        "phone": _telecom(r, "phone"),
        "email": _telecom(r, "email"),
        "address_line": ", ".join(addr.get("line") or []) or None,
        "city": addr.get("city"),
        "postal_code": addr.get("postalCode"),
        "country": addr.get("country"),
    }


def _encounter(r: dict) -> dict:
    cls = r.get("class") or {}
    typ = _coding(_first(r.get("type")))
    reason = _coding(_first(r.get("reasonCode")))
    period = r.get("period") or {}
    return {
        "id": r.get("id"),
        "identifier": _first(r.get("identifier")).get("value"),
        "patient": _ref(r.get("subject"), "Patient"),
        "status": r.get("status"),
        "class_code": cls.get("code") if isinstance(cls, dict) else None,
        "type_code": typ.get("code"),
        "type_display": typ.get("display"),
        "period_start": period.get("start"),
        "period_end": period.get("end"),
        "reason_code": reason.get("code"),
        "reason_display": reason.get("display"),
    }


def _condition(r: dict) -> dict:
    code = _coding(r.get("code"))
    return {
        "id": r.get("id"),
        "patient": _ref(r.get("subject"), "Patient"),
        "encounter": _ref(r.get("encounter"), "Encounter"),
        "code_system": code.get("system"),
        "code": code.get("code"),
        "code_display": code.get("display"),
        "clinical_status": _coding(r.get("clinicalStatus")).get("code"),
        "verification_status": _coding(r.get("verificationStatus")).get("code"),
        "onset_date": r.get("onsetDateTime"),
        "recorded_date": r.get("recordedDate"),
    }


def _observation(r: dict) -> dict:
    code = _coding(r.get("code"))
    q = r.get("valueQuantity") or {}
    text = r.get("valueString")
    if text is None and r.get("valueCodeableConcept"):
        c = _coding(r["valueCodeableConcept"])
        text = c.get("display") or c.get("code")
    number = q.get("value")
    if number is None:
        number = r.get("valueInteger")
    return {
        "id": r.get("id"),
        "patient": _ref(r.get("subject"), "Patient"),
        "encounter": _ref(r.get("encounter"), "Encounter"),
        "status": r.get("status"),
        "category": _coding(_first(r.get("category"))).get("code"),
        "code_system": code.get("system"),
        "code": code.get("code"),
        "code_display": code.get("display"),
        "effective_date": r.get("effectiveDateTime") or (r.get("effectivePeriod") or {}).get("start"),
        "value_number": float(number) if isinstance(number, int | float) and not isinstance(number, bool) else None,
        "value_unit": q.get("unit") or q.get("code"),
        "value_text": text,
    }


_FLATTEN = {"Patient": _patient, "Encounter": _encounter, "Condition": _condition, "Observation": _observation}

_TYPES = {"deceased": pa.bool_(), "value_number": pa.float64()}


def read_ndjson(path: Path, resource: str = "") -> pa.Table:
    """Flatten the resources of type ``resource`` (or of the file's only type) into a table."""
    if resource and resource not in _FLATTEN:
        raise IngestRefused(f"resource = {resource!r} is not supported; supported: {', '.join(_FLATTEN)}")
    rows: dict[str, list[dict]] = {}
    lines: dict[str, list[int]] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise IngestRefused(
                    f"{path.name} line {n}: not a JSON resource ({type(e).__name__}); "
                    "each line must hold one FHIR resource"
                ) from None
            kind = r.get("resourceType") if isinstance(r, dict) else None
            if not kind:
                raise IngestRefused(f"{path.name} line {n}: no resourceType; each line must hold one FHIR resource")
            if kind in _FLATTEN and (not resource or kind == resource):
                try:
                    rows.setdefault(kind, []).append(_FLATTEN[kind](r))
                    lines.setdefault(kind, []).append(n)
                except (AttributeError, TypeError, ValueError) as e:
                    raise IngestRefused(f"{path.name} line {n}: malformed {kind} ({e})") from None
    if not resource:
        if len(rows) != 1:
            found = ", ".join(sorted(rows)) or "none of " + ", ".join(_FLATTEN)
            raise IngestRefused(f'{path.name} holds {found}; say resource = "..." in the spec to pick one')
        resource = next(iter(rows))
    if resource not in rows:
        raise IngestRefused(f"{path.name} holds no {resource} resources")
    cols = COLUMNS[resource]
    arrays = [_column(path, c, [row[c] for row in rows[resource]], lines[resource]) for c in cols]
    return pa.Table.from_arrays(arrays, schema=pa.schema([(c, _TYPES.get(c, pa.string())) for c in cols]))


def _column(path: Path, column: str, values: list[Any], lines: list[int]) -> pa.Array:
    """One flattened column; a value of the wrong kind (a number where FHIR has text, text for a boolean) is
    refused by its line, without quoting it (it may be a name)."""
    kind = _TYPES.get(column, pa.string())
    try:
        return pa.array(values, type=kind)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        for value, n in zip(values, lines, strict=True):
            try:
                pa.array([value], type=kind)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                words = _KIND_WORDS.get(str(kind), str(kind))
                raise IngestRefused(
                    f"{path.name} line {n}: the value behind column {column!r} is not {words} as FHIR writes it; "
                    "fix the resource"
                ) from None
        raise


_KIND_WORDS = {"string": "text", "bool": "true or false", "double": "a number"}
