"""What the catalogue says about each published column, beyond its name and type: the aggregates a training
job may take its preprocessing from. Pure.

At publish, :func:`column_statistics` computes, for each column of the pseudonymised table:

- a number column (integers or floats, not booleans): its count of values, mean and standard deviation
  (``ddof=1``), each to :data:`SIGNIFICANT_DIGITS` significant digits, used by a job's ``standardise`` step
  that gives no constants of its own;
- a column of few values (text or whole numbers, at most :data:`MAX_CATEGORIES` distinct), each held by at
  least ``min_count`` patients (rows, in a table without patients): its sorted categories, used by a
  ``onehot`` step that names none.

Pseudonyms and shifted dates get neither. A column with a value held by fewer than ``min_count`` patients
lists no categories at all: the catalogue would otherwise name a rare value, and a catalogued value may leave
in a signed training record and as a label of an airlock table without a steward. Counted by rows, one
patient's six rows of a rare occupation made it a category. These are aggregates over the whole published
version, which every member of the project can compute from the data they see; the runner takes them from the
manifest it reads (root-published), never from a kernel.

Why rounded: a training record states the rows it read beside the catalogue's mean, and two records of
versions one patient apart (one withdrew consent) gave back that patient's value exactly, as the difference of
``n * mean``. A researcher's own constants are held to the same digits (:mod:`paitient.rules.jobspec`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

MAX_CATEGORIES = 50
NO_STATISTICS = frozenset({"pseudonym", "date_shift"})
SIGNIFICANT_DIGITS = 4
"""Of the mean and standard deviation the catalogue keeps (those of :mod:`paitient.rules.jobspec` too)."""


def rounded(value: float) -> float:
    """``value`` to :data:`SIGNIFICANT_DIGITS` significant digits."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _holders(column: pa.ChunkedArray | pa.Array, patients: pa.Array | None) -> tuple[list[Any], list[int]]:
    """The column's values, and for each how many patients hold it (rows, without ``patients``)."""
    if patients is None:
        counts = pc.value_counts(column.drop_null())
        return counts.field("values").to_pylist(), counts.field("counts").to_pylist()
    held = pa.table({"value": column, "patient": patients}).filter(pc.is_valid(column))
    grouped = held.group_by("value").aggregate([("patient", "count_distinct")])
    return grouped.column("value").to_pylist(), grouped.column("patient_count_distinct").to_pylist()


def _number_type(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


def column_statistics(
    table: pa.Table, columns: Iterable[Mapping[str, Any]], min_count: int, patients: Any = None
) -> dict[str, dict[str, Any]]:
    """``{column: {"count", "mean", "std"} and/or {"categories"}}`` for the described ``columns`` of ``table``
    (each a manifest column entry with ``name`` and ``action``); ``patients``: each row's patient (any values
    that tell patients apart, such as codes), where the table has them."""
    patient_array = None if patients is None else pa.array(patients)
    out: dict[str, dict[str, Any]] = {}
    for described in columns:
        name, action = str(described["name"]), str(described.get("action", ""))
        if action in NO_STATISTICS or name not in table.column_names:
            continue
        column = table.column(name)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        stats: dict[str, Any] = {}
        if _number_type(column.type):
            values = pc.cast(column, pa.float64())
            count = len(values) - values.null_count
            mean = pc.mean(values).as_py() if count else None
            std = pc.stddev(values, ddof=1).as_py() if count > 1 else None
            if mean is not None and std is not None and math.isfinite(mean) and math.isfinite(std) and std > 0:
                stats.update(count=count, mean=rounded(mean), std=rounded(std))
        if pa.types.is_integer(column.type) or pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            distinct = pc.count_distinct(column, mode="only_valid").as_py()
            if 0 < distinct <= MAX_CATEGORIES:
                values, held = _holders(column, patient_array)
                if min(held) >= min_count:
                    stats["categories"] = sorted(values)
        if stats:
            out[name] = stats
    return out


class CatalogueMissing(LookupError):
    """The catalogue holds no such statistic for a column; the message says what to give instead."""


def resolve_step(step: Mapping[str, Any], statistics: Mapping[str, Mapping[str, Any]], where: str) -> dict[str, Any]:
    """A preprocessing step with ``"from": "catalogue"`` made concrete from ``statistics`` (the manifest's, of
    the version ``where`` names); a onehot step's own categories checked to be among the catalogue's (they
    leave with the signed record: a value too rare to be catalogued may not); any other step as it is."""
    if step["op"] == "onehot" and step.get("from") != "catalogue":
        catalogued = list(statistics.get(step["column"], {}).get("categories") or ())
        given = {(type(c), c) for c in step["categories"]}
        foreign = given - {(type(c), c) for c in catalogued}
        if not catalogued or foreign:
            raise CatalogueMissing(
                f"{len(foreign)} of the {len(step['categories'])} categories given for {step['column']} are not "
                f"among those the catalogue of {where} names for it ({len(catalogued)}): a onehot step takes only "
                "catalogued categories, as the catalogue types them, since they leave with the signed record; "
                "leave categories= out to take the catalogue's, or leave the column out of the features"
            )
        return {**step, "categories": [c for c in catalogued if (type(c), c) in given]}  # the catalogue's order
    if step.get("from") != "catalogue":
        return dict(step)
    if step["op"] == "standardise":
        absent = [c for c in step["columns"] if "mean" not in statistics.get(c, {})]
        if absent:
            raise CatalogueMissing(
                f"the catalogue of {where} has no mean and spread for {', '.join(absent)} (not a number column, "
                "constant, or published before the catalogue kept them): give mean= and std= in the step, "
                "or ask the data team to publish the dataset again"
            )
        return {
            "op": "standardise",
            "columns": list(step["columns"]),
            # rounded here too: a version published before the catalogue rounded them keeps full precision
            "mean": [rounded(float(statistics[c]["mean"])) for c in step["columns"]],
            "std": [rounded(float(statistics[c]["std"])) for c in step["columns"]],
            "from": "catalogue",
        }
    column = step["column"]
    categories = statistics.get(column, {}).get("categories")
    if not categories:
        raise CatalogueMissing(
            f"the catalogue of {where} lists no categories for {column} (more than {MAX_CATEGORIES} values, a "
            "value too rare to name, or published before the catalogue kept them): a onehot step takes only "
            "catalogued categories, so leave the column out of the features, or ask the data team to publish "
            "the dataset again"
        )
    return {"op": "onehot", "column": column, "categories": list(categories), "from": "catalogue"}
