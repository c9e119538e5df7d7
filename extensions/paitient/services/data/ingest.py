"""The ingest pipeline: check the spec and the source, transform every column, check k, publish, audit.

:func:`transform` is the work (a table in, a pseudonymised table and manifest fields out, no files
written); :func:`ingest` wraps it with the key, the source file, publication and the audit record.
Every refusal is an :class:`IngestRefused` listing each problem; nothing is published then.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from paitient import __version__
from paitient.config import SiteConfig
from paitient.rules import catalogue
from paitient.rules import pseudonyms as tf
from paitient.services.data import access, detect, keys, readers, rowindex
from paitient.services.data.errors import ColumnError, IngestRefused
from paitient.services.data.publish import Published, Publisher, current_version, dataset_dir, read_manifest
from paitient.services.data.spec import Rule, Spec, check_against

MANIFEST_FORMAT = 1


@dataclass
class Outcome:
    """A transformed table and what the manifest says about it."""

    table: pa.Table
    info: dict[str, Any] = field(default_factory=dict)


def operator_name() -> str:
    """Who runs the ingest: the sudo caller if there is one, else the login name."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _check_site(site: SiteConfig, spec: Spec) -> int:
    try:
        project = site.project(spec.project)
    except KeyError as e:
        raise IngestRefused(f"project = {spec.project!r}: {e.args[0]}") from None
    if spec.dataset not in project.datasets:
        listed = ", ".join(project.datasets) or "none"
        raise IngestRefused(
            f"dataset = {spec.dataset!r} is not one of the datasets of project {spec.project!r} ({listed}); "
            "add it to the project's datasets in the site configuration first"
        )
    if spec.min_k and spec.min_k < site.workspace.min_k:
        raise IngestRefused(
            f"min_k = {spec.min_k} is below the site's minimum {site.workspace.min_k}; a spec may only raise it"
        )
    return max(spec.min_k, site.workspace.min_k)


def _row_hint(spec: Spec, e: ColumnError) -> str:
    if spec.format == "csv" and e.row is not None:
        return f"{e} (line {e.row + 1} of the CSV)"
    return str(e)


def _undeclared(spec: Spec, table: pa.Table) -> list[str]:
    problems = []
    for col in table.column_names:
        if col in spec.rules:
            continue
        what = detect.by_name(col)
        row = None
        if what is None:
            found = detect.by_content(table.column(col))
            if found:
                what, row = found
                what = f"values like {what}" + (f" (first at row {row})" if row else "")
        else:
            what = f"a name that suggests {what}"
        if what and what.startswith(f"values like {detect.DATES}"):
            fmt = detect.date_format(table.column(col))
            rule = '"date_shift"' if not fmt else f'{{ action = "date_shift", format = "{fmt}" }}'
            if fmt == "?":
                rule = '{ action = "date_shift", format = "<the strptime format its dates are written in>" }'
            problems.append(
                f"column {col!r} is not in the spec and has {what}; declare it as a date in [columns] "
                f'({col} = {rule}, or generalise it to years), or drop it ({col} = "drop")'
            )
        elif what:
            problems.append(
                f"column {col!r} is not in the spec and has {what}; declare it in [columns] "
                f'({col} = "drop", "pseudonym" for an identifier you need to link rows, "date_shift" '
                'for dates), or if it is not identifying, say so with "keep"'
            )
    return problems


def _collisions(spec: Spec, table: pa.Table) -> list[str]:
    """Two columns that would come out under one name: the later would silently replace the earlier
    (a raw identifier published as the pseudonym column). Dropped columns come out as nothing."""
    kept = [c for c in table.column_names if (spec.rules.get(c) is None or spec.rules[c].action != "drop")]
    problems = []
    for col in kept:
        rule = spec.rules.get(col)
        if rule is None or rule.output == col:
            continue
        if rule.output in kept:
            other = spec.rules.get(rule.output)
            if other is None:
                why = "not in the spec, so it is kept as it is and would take the name"
            elif other.output == other.column:
                why = f"declared {other.action}, under the same name"
            else:  # renamed away: still one name for two different columns, the source's and the published one
                why = f"declared {other.action}, renamed to {other.output!r}"
            problems.append(
                f"[columns] {col!r} is renamed to {rule.output!r}, but the source also has a column {rule.output!r} "
                f"({why}); rename {col!r} to a name no other column has, or drop the other column "
                f'({rule.output} = "drop")'
            )
    return problems


def _apply(
    rule: Rule,
    arr: pa.ChunkedArray,
    *,
    pkey: bytes,
    patient: tuple[np.ndarray, pa.Array] | None,
    patient_col: str,
    patient_digests: np.ndarray | None,
    offsets: np.ndarray | None,
    time_zone: str = "",
) -> pa.Array:
    col, p = rule.column, rule.params
    if rule.action == "pseudonym":
        if patient is not None and col == patient_col:
            return tf.pseudonyms_by_code(
                patient[0],
                patient[1],
                pkey,
                domain=p["domain"],
                prefix=p["prefix"],
                column=col,
                precomputed=None if p["domain"] else patient_digests,
            )
        return tf.pseudonymise(arr, pkey, domain=p["domain"], prefix=p["prefix"], column=col)
    if rule.action == "date_shift":
        dates = tf.wall_clock(tf.parse_dates(arr, col, p["format"]), col, time_zone)
        if patient is None or offsets is None:  # parse_spec requires patient_id for date_shift
            raise ColumnError(col, "date_shift needs patient_id = <column> in the spec")
        unknown = patient[0] < 0
        if unknown.any():
            missing = pc.and_(pc.is_valid(dates), pa.array(unknown)).to_numpy(zero_copy_only=False)
            if missing.any():
                raise ColumnError(
                    col,
                    "has a date but the patient id is missing, so it cannot be shifted; "
                    "fill in the patient id or drop the row",
                    int(np.argmax(missing)) + 1,
                )
        return tf.shift_dates(dates, offsets, col)
    if rule.action == "keep":
        return _typed(arr, col, p.get("type", ""))
    pcodes = patient[0] if patient is not None else None
    if rule.method == "age_band":
        return tf.age_bands(arr, col, width=p["width"], top=p["top"], edges=p["edges"] or None)
    if rule.method == "year":
        return tf.years(arr, col, width=p["width"], fmt=p["format"])
    if rule.method == "prefix":
        out = tf.prefixes(arr, length=p["length"])
        if p["min_count"] > 1:
            out = tf.rare_to_other(out, min_count=p["min_count"], other=p["other"], patient_codes=pcodes)
        return out
    return tf.rare_to_other(arr, min_count=p["min_count"], other=p["other"], patient_codes=pcodes)


def _typed(arr: pa.ChunkedArray, col: str, typ: str) -> pa.Array | pa.ChunkedArray:
    if not typ:
        return arr
    if typ == "date":
        return tf.parse_dates(arr, col)
    target = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}[typ]
    try:
        return arr.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for i, v in enumerate(arr.to_pylist()):
            try:
                pa.array([v]).cast(target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ColumnError(col, f"does not parse as {typ}; fix the value or the declared type", i + 1) from None
        raise


def transform(site: SiteConfig, spec: Spec, table: pa.Table, master: bytes) -> Outcome:
    """Apply the spec to ``table``; refuse with every problem found. Writes nothing."""
    min_k = _check_site(site, spec)
    if table.num_rows == 0:
        raise IngestRefused(f"{spec.source.name} holds no data rows; there is nothing to publish")
    pkey = keys.project_key(master, spec.project)
    # From here on, a dictionary holds only what rows use: detection, transforms and the file see the same.
    table = tf.used_values_only_table(table)
    problems = _collisions(spec, table)
    problems += _undeclared(spec, table) if spec.strict else []
    patient = offsets = digests = None
    if spec.patient_id:
        pcodes, pvalues, digests = tf.hashed_identifiers(table.column(spec.patient_id), pkey)
        patient = (pcodes, pvalues)
        ws = site.workspace
        step = 7 if ws.date_shift_unit == "week" else 1  # days in one unit of offset
        offsets = tf.row_offsets(patient[0], tf.shifts_from_digests(digests, ws.date_shift_days, step))
    out_cols: dict[str, pa.Array | pa.ChunkedArray] = {}
    described = []
    for col in table.column_names:
        rule = spec.rules.get(col) or Rule(column=col, action="keep")
        if rule.action == "drop":
            continue
        if rule.output in out_cols:  # never let one column replace another; _collisions has said why
            if not problems:
                raise IngestRefused(f"two columns would come out as {rule.output!r}; rename one of them")
            continue
        try:
            out_cols[rule.output] = _apply(
                rule,
                table.column(col),
                pkey=pkey,
                patient=patient,
                patient_col=spec.patient_id,
                patient_digests=digests,
                offsets=offsets,
                time_zone=site.workspace.time_zone,
            )
        except ColumnError as e:
            problems.append(_row_hint(spec, e))
            continue
        described.append(
            {
                "name": rule.output,
                "source": col,
                "action": rule.action if col in spec.rules else "keep (undeclared)",
                **({"method": rule.method} if rule.method else {}),
            }
        )
    if problems:
        raise IngestRefused(problems)
    # Published as the values and the key say, never as the source had it: rows in a keyed order of their
    # values, dictionaries cut to used values (generated labels no row took) and listed in the order those
    # rows first hold them. The source's row order (an export sorted by record number or admission) would
    # rank patients and let two projects' copies of one export be joined row by row.
    result, order = tf.in_keyed_order(pa.table(out_cols), pkey)
    if patient is not None:
        patient = (patient[0][order], patient[1])
    for d in described:
        t = result.schema.field(d["name"]).type
        d["type"] = str(t.value_type if pa.types.is_dictionary(t) else t)
    statistics = catalogue.column_statistics(
        result, described, min_count=min_k, patients=patient[0] if patient is not None else None
    )
    for d in described:
        d.update(statistics.get(d["name"], {}))
    qis = [spec.rules[q].output for q in spec.quasi_identifiers]
    k: int | None = None
    smallest: dict[str, object] = {}
    if qis:
        k, smallest = tf.k_anonymity(result, qis, patient[0] if patient is not None else None)
        if k < min_k:
            group = ", ".join(f"{c} = {v!r}" for c, v in smallest.items())
            unit = "patients" if patient is not None else "rows"
            advice = (
                "generalise the quasi-identifiers more (wider age bands, shorter postcode prefixes, rare "
                "categories to 'other')"
            )
            raise IngestRefused(
                f"k-anonymity {k} is below the minimum {min_k}: the group ({group}) has only {k} {unit}; {advice}",
                # the trail names the columns, not the group's values
                [
                    f"k-anonymity {k} is below the minimum {min_k}: the smallest group over "
                    f"{', '.join(smallest)} has only {k} {unit}; {advice}"
                ],
            )
    info = {
        "rows": result.num_rows,
        "columns": described,
        "dropped": [c for c, r in spec.rules.items() if r.action == "drop"],
        "patients": len(patient[1]) if patient is not None else None,
        "quasi_identifiers": qis,
        "k": k,
        "k_unit": "patients" if patient is not None else "rows",
        "min_k": min_k,
        "date_shift_days": site.workspace.date_shift_days,
        "date_shift_unit": site.workspace.date_shift_unit,
        **({"time_zone": site.workspace.time_zone} if site.workspace.time_zone else {}),
        "key_id": keys.key_id(pkey),
        "spec_sha256": _spec_digest(spec, site),
    }
    return Outcome(result, info)


def manifest_for(spec: Spec, outcome: Outcome, source_sha256: str, operator: str) -> dict[str, Any]:
    return {
        "manifest_format": MANIFEST_FORMAT,
        "project": spec.project,
        "dataset": spec.dataset,
        "description": spec.description,
        "source_format": spec.format + (f":{spec.resource}" if spec.resource else ""),
        "source_sha256": source_sha256,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "operator": operator,
        "paitient_version": __version__,
        **outcome.info,
    }


def _spec_digest(spec: Spec, site: SiteConfig) -> str:
    ws = site.workspace
    return spec.digest(
        min_k=ws.min_k, date_shift_days=ws.date_shift_days, date_shift_unit=ws.date_shift_unit, time_zone=ws.time_zone
    )


def is_current(site: SiteConfig, spec: Spec, source_sha256: str, master: bytes) -> bool:
    """Whether the current version came from this very spec, source and key (a re-ingest would repeat it)."""
    m = read_manifest(dataset_dir(site.data_root, spec.project, spec.dataset))
    if not m:
        return False
    return (
        m.get("spec_sha256") == _spec_digest(spec, site)
        and m.get("source_sha256") == source_sha256
        and m.get("key_id") == keys.key_id(keys.project_key(master, spec.project))
    )


def ingest(
    site: SiteConfig,
    spec: Spec,
    *,
    operator: str | None = None,
    dry_run: bool = False,
    publisher: Publisher | None = None,
    skip_unchanged: bool = False,
) -> Published | Outcome | None:
    """Pseudonymise ``spec.source`` and publish it as the next version of the dataset.

    Returns the :class:`Published` version; with ``dry_run`` the :class:`Outcome` (nothing written);
    with ``skip_unchanged`` ``None`` when the current version already came from this spec, source and key.
    Refusals raise :class:`IngestRefused` and are recorded in the audit trail as ``denied``.
    """
    from paitient.services import audit

    operator = operator or operator_name()
    obj = f"{spec.project}/{spec.dataset}"
    try:
        master = keys.load_master_key(site)
        _check_site(site, spec)
        source_sha = readers.sha256_file(spec.source) if spec.source.is_file() else ""
        if skip_unchanged and source_sha and is_current(site, spec, source_sha, master):
            return None
        table, all_columns = readers.read_source(spec)
        check_against(spec, all_columns)
        outcome = transform(site, spec, table, master)
        index = None
        if not dry_run:
            try:
                index = rowindex.build(outcome.table, {"columns": outcome.info["columns"]}, rowindex.ensure_key(site))
            except rowindex.IndexRefused as e:
                raise IngestRefused(str(e)) from None
    except Exception as e:
        # a refusal with its problems; anything else (not a refusal this code foresaw) is on the trail all
        # the same, by the error's kind alone: its message may quote a source value
        if not dry_run:
            said: dict[str, Any]
            if isinstance(e, IngestRefused):
                verdict, said = "denied", {"problems": e.recorded[:20]}
            else:
                verdict, said = "error", {"error": type(e).__name__}
            audit.emit(
                site,
                actor=operator,
                action="ingest.publish",
                object=obj,
                outcome=verdict,
                details={"project": spec.project, "dataset": spec.dataset, **said},
            )
        raise
    if dry_run:
        return outcome
    assert index is not None  # built above whenever this is no dry run
    manifest = manifest_for(spec, outcome, source_sha, operator)
    publisher = publisher or Publisher(
        site.data_root, site.state_dir / "locks", group_of=lambda project: access.project_gid(site, project)
    )
    placed: list[tuple[int, Path]] = []

    def place_index(version: int, _path: Path) -> None:
        # the version's row-detection index is in place before the version becomes current
        placed.append(
            (version, rowindex.save(site, index, rowindex.index_dir(site, spec.project, spec.dataset, version)))
        )

    try:
        published = publisher.publish(spec.project, spec.dataset, outcome.table, manifest, before_switch=place_index)
    except BaseException:
        # a version that became current before the failure (an fsync after the switch) keeps its index: the
        # egress gate matches its rows by it
        current = current_version(dataset_dir(site.data_root, spec.project, spec.dataset))
        for version, path in placed:
            if version != current:
                rowindex.remove(path)
        raise
    audit.emit(
        site,
        actor=operator,
        action="ingest.publish",
        object=f"{obj}@v{published.version}",
        details={
            "project": spec.project,
            "dataset": spec.dataset,
            "version": published.version,
            "rows": manifest["rows"],
            "k": manifest["k"],
            "spec_sha256": manifest["spec_sha256"],
            "source_sha256": source_sha,
            "key_id": manifest["key_id"],
            "row_index_entries": len(index),
        },
    )
    return published
