"""Disclosure checks for tables (CSV, Parquet).

Two ways to check, depending on what the request carries:

- The table alone. Cells that hold whole numbers are read as counts: a count below the minimum
  (default 10) or a zero (when zeros are disclosive) fails. Dominance (n, k) and the p-ratio need the
  values that make up each cell, which a finished table does not contain: they are reported as
  "needs review" unless the request also carries the table's recipe.
- The table with its recipe (``{"dataset": "...", "index": [...], "columns": [...], "values": ...,
  "aggfunc": ...}``): the service recomputes the table from the dataset with ACRO's ``crosstab``, which
  applies the minimum-count, dominance, p-ratio and zeros rules cell by cell, and compares the result with
  the submitted table. ACRO 1.0.2 marks every cell of a ``std`` table as failing its degrees-of-freedom
  check (so its suppression blanks the whole table); for ``std`` the rules are applied to the ``mean``
  table over the same cells, which has the same contributors.

Every function returns check results: ``{"check", "status" (pass|fail|review|error), "reason", "details"}``.
"""

from __future__ import annotations

import decimal
import io
import logging
import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from paitient.rules.values import once_per_value

MAX_CELLS_LISTED = 50


@dataclass(frozen=True)
class TableRules:
    min_count: int = 10
    nk_n: int = 2
    nk_k: float = 0.9
    p_ratio: float = 0.1
    zeros_disclosive: bool = True


class TableError(ValueError):
    """The file is not a table the airlock can read; the message says what to send instead."""


def result(check: str, status: str, reason: str, **details: Any) -> dict[str, Any]:
    return {"check": check, "status": status, "reason": reason, "details": details}


def read_table(data: bytes, filename: str) -> pd.DataFrame:
    """Read CSV or Parquet by content (Parquet files start and end with ``PAR1``)."""
    if data[:4] == b"PAR1" and data[-4:] == b"PAR1":
        try:
            return pd.read_parquet(io.BytesIO(data))
        except Exception as e:
            raise TableError(f"{filename}: not a readable Parquet file ({e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TableError(
            f"{filename}: neither Parquet nor UTF-8 CSV; save tables with df.to_csv or df.to_parquet"
        ) from None
    try:
        return pd.read_csv(io.StringIO(text))
    except Exception as e:
        raise TableError(f"{filename}: not a readable CSV file ({e})") from None


def count_columns(df: pd.DataFrame) -> list[Any]:
    """The columns read as counts: numeric (not boolean) with whole numbers only, and at least one value."""
    out = []
    for col in df.columns:
        s = df[col]
        if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            continue
        values = s.to_numpy(dtype=float, na_value=np.nan)
        present = ~np.isnan(values)
        if present.any() and np.all(values[present] == np.round(values[present])):
            out.append(col)
    return out


def count_cells(df: pd.DataFrame) -> list[tuple[int, str, float]]:
    """The cells read as counts: (row, column, value) for whole-number numeric cells, row by row within each
    column of :func:`count_columns`."""
    cells: list[tuple[int, str, float]] = []
    for col in count_columns(df):
        values = df[col].to_numpy(dtype=float, na_value=np.nan)
        rows = np.flatnonzero(~np.isnan(values))
        name = str(col)
        cells.extend(zip(rows.tolist(), [name] * len(rows), values[rows].tolist(), strict=True))
    return cells


_TEXT_COUNT = re.compile(r"^\(?\s*(\d+)\s*\+?\s*\)?\s*(?:[,(]\s*\d+(?:\.\d+)?\s*%\s*\)?)?$", re.ASCII)
"""A whole number written as text as tables write counts: ``3``, ``(3)``, ``3+``, ``3, 1.5%``, ``3 (1.5%)``; not
a percentage alone (``3%``)."""


def text_count_cells(df: pd.DataFrame) -> list[tuple[int, str, float]]:
    """The text cells that read as a count (:data:`_TEXT_COUNT`): (row, column, the whole number), row by row
    within each column. The checks read counts from numeric columns; a count written ``3+`` is text to them."""
    cells: list[tuple[int, str, float]] = []
    for col in df.columns:
        if pd.api.types.is_numeric_dtype(df[col]):
            continue
        for row, value in enumerate(df[col].tolist()):
            m = _TEXT_COUNT.match(value.strip()) if isinstance(value, str) else None
            if m:
                cells.append((row, str(col), float(m.group(1))))
    return cells


def _listed(cells: list[tuple[int, str, float]]) -> list[dict[str, Any]]:
    return [{"row": r, "column": c, "value": v} for r, c, v in cells[:MAX_CELLS_LISTED]]


def check_min_count(cells: list[tuple[int, str, float]], min_count: int) -> dict[str, Any]:
    small = [c for c in cells if 0 < c[2] < min_count]
    if small:
        return result(
            "minimum_count",
            "fail",
            f"{len(small)} cell(s) count fewer than {min_count} individuals; merge categories or suppress these cells",
            threshold=min_count,
            cells=_listed(small),
        )
    return result("minimum_count", "pass", f"every count is at least {min_count} (or zero)", threshold=min_count)


def check_zeros(cells: list[tuple[int, str, float]], zeros_disclosive: bool) -> dict[str, Any]:
    zeros = [c for c in cells if c[2] == 0]
    if zeros and zeros_disclosive:
        return result(
            "zeros",
            "fail",
            f"{len(zeros)} cell(s) are zero, which can disclose that no one has an attribute; "
            "merge categories or explain why the zero is structural",
            cells=_listed(zeros),
        )
    return result("zeros", "pass", "no zero cells" if not zeros else "zeros are not disclosive at this site")


def check_table_alone(df: pd.DataFrame, rules: TableRules) -> list[dict[str, Any]]:
    """Rules that can be applied to a finished table."""
    cells = count_cells(df)
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
    out: list[dict[str, Any]] = []
    if not cells:
        out.append(
            result(
                "minimum_count",
                "review",
                "no column holds whole-number counts, so cell sizes cannot be checked from the table "
                "alone; submit the table's recipe or state each cell's count in the justification",
            )
        )
    else:
        out.append(check_min_count(cells, rules.min_count))
        out.append(check_zeros(cells, rules.zeros_disclosive))
    written = [c for c in text_count_cells(df) if 0 < c[2] < rules.min_count]
    if written and out[0]["status"] != "fail":
        out[0] = result(
            "minimum_count",
            "review",
            f"{len(written)} cell(s) hold a number below {rules.min_count} written as text (such as '3+', '(3)' or "
            "'3, 1.5%'), which the checks do not read as a count: if they count individuals, merge categories or "
            "suppress them, and write counts as numbers",
            threshold=rules.min_count,
            cells=_listed(written),
        )
    non_count = sorted({str(c) for c in numeric} - {c for _, c, _ in cells})
    if cells and not non_count:
        out.append(
            result(
                "dominance",
                "pass",
                "a frequency table (every number is a count): dominance and p-ratio apply to tables of magnitudes only",
            )
        )
    else:
        out.append(
            result(
                "dominance",
                "review",
                f"dominance (n={rules.nk_n}, k={rules.nk_k}) and p-ratio ({rules.p_ratio}) need the "
                "values behind each cell; without the table's recipe a steward checks them by hand",
                statistic_columns=non_count,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------
# With a recipe: recompute through ACRO


RECIPE_KEYS = {"dataset", "version", "index", "columns", "values", "aggfunc", "filter"}
FILTER_OPS = ("in", "not", "<", "<=", ">", ">=")
AGGFUNCS = ("count", "mean", "sum", "median", "std", "min", "max")
_ACRO_CHECKS = {
    "MinimumThresholdCheck": "minimum_count",
    "NKCheck": "dominance",
    "PPercentCheck": "p_ratio",
    "ZerosCheck": "zeros",
    "MissingValuesCheck": "missing",
    "NegativeValuesCheck": "negative",
}


def validate_recipe(recipe: Any) -> dict[str, Any]:
    if not isinstance(recipe, dict):
        raise TableError("the table recipe must be a dict with dataset, index, columns, values, aggfunc")
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise TableError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(RECIPE_KEYS)}")
    for key in ("index", "columns"):
        v = recipe.get(key, [])
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise TableError(f"recipe {key!r} must be a column name or a list of column names")
        recipe = {**recipe, key: v}
    if not recipe["index"]:
        raise TableError("the recipe needs at least one 'index' column")
    agg = recipe.get("aggfunc", "count" if recipe.get("values") is None else "mean")
    if agg not in AGGFUNCS:
        raise TableError(f"recipe aggfunc {agg!r} is not supported; use one of {', '.join(AGGFUNCS)}")
    if (agg == "count") != (recipe.get("values") is None):
        raise TableError("a count table has no 'values'; any other aggfunc needs 'values'")
    if not isinstance(recipe.get("dataset"), str) or not recipe["dataset"]:
        raise TableError("the recipe needs 'dataset': the name of one of the project's datasets")
    return {**recipe, "aggfunc": agg, "filter": validate_filter(recipe.get("filter"))}


def validate_filter(spec: Any) -> dict[str, dict[str, Any]]:
    """The recipe's population filter, ``{column: condition}``: a value (equal to it), a list (one of them), or
    a dict of ``in``/``not`` (lists) and ``<``, ``<=``, ``>``, ``>=`` (numbers). Every condition must hold."""
    if spec is None:
        return {}
    hint = "e.g. filter={'age': {'<': 90}, 'sex': ['F']}"
    if not isinstance(spec, dict):
        raise TableError(f"the recipe's 'filter' must map column names to conditions; {hint}")
    out: dict[str, dict[str, Any]] = {}
    for col, cond in spec.items():
        if not isinstance(col, str) or not col:
            raise TableError(f"filter keys must be column names; {hint}")
        if not isinstance(cond, dict):
            cond = {"in": list(cond) if isinstance(cond, list | tuple) else [cond]}
        unknown = set(cond) - set(FILTER_OPS)
        if unknown or not cond:
            raise TableError(f"filter on {col!r}: conditions are {', '.join(FILTER_OPS)}; got {sorted(map(str, cond))}")
        for op, v in cond.items():
            if op in ("in", "not"):
                if not isinstance(v, list | tuple) or not all(isinstance(x, str | int | float | bool) for x in v):
                    raise TableError(f"filter on {col!r}: {op!r} takes a list of values")
            elif isinstance(v, bool) or not isinstance(v, int | float):
                raise TableError(f"filter on {col!r}: {op!r} takes a number")
        out[col] = {op: list(v) if op in ("in", "not") else v for op, v in cond.items()}
    return out


def filter_mask(data: pd.DataFrame, spec: dict[str, dict[str, Any]]) -> pd.Series:
    """Which rows of ``data`` the (validated) filter lets through."""
    mask = pd.Series(True, index=data.index)
    for col, cond in spec.items():
        if col not in data:
            raise TableError(f"the recipe's filter names {col!r}, which the dataset does not have")
        s = data[col]
        for op, v in cond.items():
            if op == "in":
                mask &= s.isin(v) | s.astype(str).isin([str(x) for x in v])
            elif op == "not":
                mask &= ~(s.isin(v) | s.astype(str).isin([str(x) for x in v]))
            else:
                if not pd.api.types.is_numeric_dtype(s):
                    raise TableError(f"the filter compares {col!r} with a number, but it is not a number column")
                mask &= {"<": s < v, "<=": s <= v, ">": s > v, ">=": s >= v}[op].fillna(False)
    return mask


def population(data: pd.DataFrame, spec: dict[str, dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    """The filter as the values it lets through, per column it restricts (``{}``: everyone): a form in which
    one filter's population can be compared with another's (:func:`paitient.rules.differencing.population_within`)."""
    kept = data[filter_mask(data, spec)]
    out = {}
    for col in spec:
        let_through = tuple(sorted({_value_text(v) for v in kept[col].dropna().unique()}))
        everything = {_value_text(v) for v in data[col].dropna().unique()}
        if set(let_through) != everything or data[col].isna().any():
            out[col] = let_through
    return out


def _value_text(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def recipe_rows(data: pd.DataFrame, recipe: dict[str, Any]) -> pd.DataFrame:
    """The rows the recipe's filter lets through."""
    spec = recipe.get("filter") or {}
    return data[filter_mask(data, spec)] if spec else data


def _crosstab_frame(
    data: pd.DataFrame, recipe: dict[str, Any]
) -> tuple[list[pd.Series], list[pd.Series] | None, pd.Series | None]:
    index = [data[c] for c in recipe["index"]]
    columns = [data[c] for c in recipe["columns"]] if recipe["columns"] else None
    values = data[recipe["values"]] if recipe.get("values") else None
    return index, columns, values


def check_with_recipe(
    submitted: pd.DataFrame, data: pd.DataFrame, recipe: dict[str, Any], rules: TableRules
) -> list[dict[str, Any]]:
    """Recompute the table from ``data`` through ACRO and report each rule and whether the table matches."""
    from acro import ACRO

    missing = [c for c in [*recipe["index"], *recipe["columns"], recipe.get("values")] if c and c not in data]
    if missing:
        return [result("recipe", "fail", f"the dataset has no column(s) {missing}; correct the recipe")]
    try:
        data = recipe_rows(data, recipe)
    except TableError as e:
        return [result("recipe", "fail", f"{e}; correct the recipe's filter")]
    logging.getLogger("acro").setLevel(logging.WARNING)
    acro = ACRO(suppress=False)
    # sdc_checks.risk_appetite is this same dict, so the site's rules apply to every check.
    acro.config.update(
        {
            "safe_threshold": rules.min_count,
            "safe_nk_n": rules.nk_n,
            "safe_nk_k": rules.nk_k,
            "safe_pratio_p": rules.p_ratio,
            "zeros_are_disclosive": rules.zeros_disclosive,
        }
    )
    index, columns, values = _crosstab_frame(data, recipe)
    agg = recipe["aggfunc"]
    if columns is None:
        columns = [pd.Series(["all"] * len(data), index=data.index, name="all")]
    if agg == "count":
        acro.crosstab(index, columns)
    else:
        # ACRO 1.0.2 fails every cell of a std table on degrees of freedom; mean has the same contributors.
        acro.crosstab(index, columns, values=values, aggfunc="mean" if agg == "std" else agg)
    record = list(acro.results.results.values())[-1]
    sdc = record.sdc or {"summary": {}, "cells": {}}
    out = []
    for acro_name, name in _ACRO_CHECKS.items():
        if acro_name not in sdc["summary"]:
            continue
        n = int(sdc["summary"][acro_name])
        cells = sdc["cells"].get(acro_name, [])[:MAX_CELLS_LISTED]
        if n:
            out.append(
                result(
                    name,
                    "fail",
                    f"{n} cell(s) fail {name.replace('_', ' ')} (ACRO {acro_name}); merge categories or suppress them",
                    cells=cells,
                )
            )
        else:
            out.append(result(name, "pass", f"every cell passes {name.replace('_', ' ')} (ACRO {acro_name})"))
    if not any(r["check"] == "zeros" for r in out):
        index, columns, _ = _crosstab_frame(data, recipe)
        counts = pd.crosstab(index, columns) if columns is not None else pd.crosstab(index, "n")
        out.append(check_zeros(count_cells(counts.reset_index(drop=True)), rules.zeros_disclosive))
    out.append(_compare(submitted, data, recipe))
    return out


def unseen_release_refusal(recipe: dict[str, Any]) -> str | None:
    """Why a (validated, matching) recipe's table may not leave without a steward, or ``None`` when it may.

    Only counts: the mean, sum, minimum or maximum of a group can be one person's value (a maximum always
    is), and two sums over populations one person apart give that person's value, which the differencing of
    counts does not look at. And only counts of the whole dataset: the kernel reads every row, so a filter
    lets it choose the population, and with it each count. A threshold or a list of values makes a count any
    number it wants (a patient's age as the count of women aged 20 to 20 + k), and even a filter of catalogued
    labels is a subset of the kernel's choosing (a bit per category), which no check of the table can tell."""
    if recipe["aggfunc"] != "count":
        return (
            f"only count tables leave without a steward: a {recipe['aggfunc']} can be one person's value, "
            "or give one by difference with another"
        )
    if recipe.get("filter"):
        columns = ", ".join(repr(c) for c in recipe["filter"])
        return (
            f"the recipe filters its population (on {columns}): which people a filter picks is the kernel's "
            "choice, and with it each count, so a steward reads it; a count table of the whole dataset leaves "
            "by itself"
        )
    return None


def recomputed(data: pd.DataFrame, recipe: dict[str, Any]) -> pd.DataFrame:
    """The recipe's table as pandas computes it from ``data`` (rows: the index variables; columns: the column
    variables, or one column ``n`` or the ``values`` name)."""
    index, columns, values = _crosstab_frame(data, recipe)
    agg = recipe["aggfunc"]
    if columns is None:
        if agg == "count":
            return pd.crosstab(index, columns=pd.Series(["n"] * len(data), index=data.index))
        return data.groupby(recipe["index"])[recipe["values"]].agg(agg).to_frame()
    if agg == "count":
        return pd.crosstab(index, columns)
    return pd.crosstab(index, columns, values=values, aggfunc=agg)


def _key_text(v: Any) -> str:
    """A category as it is compared between the dataset and a submitted table: its text, whole numbers
    without ``.0``, white space collapsed (as a released cell is)."""
    if isinstance(v, float | np.floating) and float(v).is_integer():
        v = int(v)
    if isinstance(v, np.generic):
        v = v.item()
    return " ".join(unicodedata.normalize("NFC", str(v)).split())


def _expected_cells(table: pd.DataFrame, recipe: dict[str, Any]) -> dict[tuple[str, ...], float]:
    """Each non-empty cell of the recomputed table under its categories, in the order of the recipe's index
    then column variables (none for a table without column variables)."""
    cells: dict[tuple[str, ...], float] = {}
    with_columns = bool(recipe["columns"])
    for row_key, row in table.iterrows():
        rows = row_key if isinstance(row_key, tuple) else (row_key,)
        for col_key, value in row.items():
            if pd.isna(value):
                continue
            cols = (col_key if isinstance(col_key, tuple) else (col_key,)) if with_columns else ()
            cells[tuple(_key_text(v) for v in (*rows, *cols))] = value
    return cells


def _submitted_cells(
    submitted: pd.DataFrame, recipe: dict[str, Any]
) -> tuple[dict[tuple[str, ...], list[tuple[int, str, Any]]], str | None]:
    """The submitted table's numbers under their categories, read from its label columns (named after the
    recipe's variables, or, for variables no column is named after, its other text columns in order) and,
    for the one variable no column holds (a wide table's column variable), the number's header. Each key
    lists every cell found under it (row, header, value). The second value says why the table cannot be read
    this way, or is None."""
    variables = [*recipe["index"], *recipe["columns"]]
    wanted = {normalise_label(v): v for v in variables}
    by_var: dict[str, Any] = {}
    for col in submitted.columns:
        var = wanted.get(normalise_label(col))
        if var is not None and var not in by_var:
            by_var[var] = col
    labelled = set(by_var.values())
    numbers = [
        c
        for c in submitted.columns
        if c not in labelled
        and pd.api.types.is_numeric_dtype(submitted[c])
        and not pd.api.types.is_bool_dtype(submitted[c])
    ]
    others = [c for c in submitted.columns if c not in labelled and c not in numbers]
    for var in variables:
        if var not in by_var and others:
            by_var[var] = others.pop(0)
    missing = [v for v in variables if v not in by_var]
    if len(missing) > 1:
        return {}, (
            f"the table names no column for {len(missing)} of the recipe's variables; give each variable but one "
            "a column of its categories, named after it (df.reset_index()), and the last one's categories as headers"
        )
    cells: dict[tuple[str, ...], list[tuple[int, str, Any]]] = {}
    for col in numbers:
        values = submitted[col].tolist()
        for r, value in enumerate(values):
            if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
                continue
            found = {v: _key_text(submitted[by_var[v]].iloc[r]) for v in by_var}
            if missing:
                found[missing[0]] = _key_text(col)
            key = tuple(found[v] for v in variables)
            cells.setdefault(key, []).append((r, str(col), value))
    return cells, None


def written_as(value: Any, expected: Any) -> bool:
    """Is ``value`` (a number read from the released file) the recomputed ``expected`` exactly, or that value
    rounded to the decimals ``value`` is written with? A whole-number value (a count) must equal it exactly."""
    try:
        got = float(value)
        want = float(expected)
    except (TypeError, ValueError):
        return False
    if not (math.isfinite(got) and math.isfinite(want)):
        return False
    if got == want:
        return True
    if isinstance(expected, int | np.integer) or want.is_integer() and isinstance(value, int | np.integer):
        return False
    written = decimal.Decimal(repr(got))
    exponent = written.as_tuple().exponent
    assert isinstance(exponent, int)
    try:
        rounded = decimal.Decimal(want).quantize(decimal.Decimal(1).scaleb(exponent), rounding=decimal.ROUND_HALF_EVEN)
    except decimal.InvalidOperation:
        return False
    if rounded == written:
        return True
    return bool(exponent <= 0 and float(np.round(want, -exponent)) == got)  # numpy's own rounding (df.round)


def _compare(submitted: pd.DataFrame, data: pd.DataFrame, recipe: dict[str, Any]) -> dict[str, Any]:
    """Does each number of the submitted table stand under the categories the recipe gives it, and is it the
    number the recipe recomputes there (exactly, or rounded to the decimals it is written with)? Every
    recomputed cell must be there once, and no other number."""
    expected = _expected_cells(recomputed(data, recipe), recipe)
    cells, unreadable = _submitted_cells(submitted, recipe)
    fix = "submit the table the recipe makes (its numbers, rounded or not, under their labels), or correct the recipe"
    if unreadable:
        return result("recipe", "fail", f"{unreadable}; {fix}", expected_cells=len(expected))
    wrong: list[dict[str, Any]] = []
    unknown = twice = 0
    for key, found in cells.items():
        if len(found) > 1:
            twice += 1
        if key not in expected:
            unknown += len(found)
        for r, col, value in found:
            if key in expected and not written_as(value, expected[key]):
                wrong.append({"row": r, "column": col, "value": float(value), "recipe": float(expected[key])})
    absent = len(set(expected) - set(cells))
    if not (wrong or unknown or twice or absent):
        return result(
            "recipe",
            "pass",
            f"each of the table's {len(expected)} numbers is the one its recipe recomputes from the dataset under its "
            "labels, to every digit written",
            cells=len(expected),
        )
    problems = [
        f"{len(wrong)} number(s) differ from what the recipe recomputes under their labels (exactly, or rounded to "
        "the decimals written)" * bool(wrong),
        f"{unknown} number(s) stand under labels the recipe's table has no cell for" * bool(unknown),
        f"{twice} cell(s) of the recipe's table appear more than once" * bool(twice),
        f"{absent} cell(s) of the recipe's table are missing" * bool(absent),
    ]
    return result(
        "recipe",
        "fail",
        "the submitted table does not hold the numbers its recipe produces from the dataset: "
        + "; ".join(p for p in problems if p)
        + f"; {fix}",
        expected_cells=len(expected),
        submitted_cells=sum(len(f) for f in cells.values()),
        cells=wrong[:MAX_CELLS_LISTED],
    )


# ---------------------------------------------------------------------------------------------------
# Content: labels, not free text

STATISTIC_WORDS = frozenset(
    "n count counts number patients people persons cases total all overall mean average median std sd se min "
    "max sum percent pct proportion share rate ratio of per by and in with without missing unknown other none "
    "group category value values variable statistic index label year years age band bands lower upper ci".split()
)
"""Words a column header may be made of besides the labels of the project (``mean_age``, ``n patients``)."""
_NUMBER_LIKE = re.compile(
    r"^[(\[]?\s*(?:[<>≤≥]=?\s*)?[-+]?(?:\d[\d,]*)?\.?\d+(?:[eE][-+]?\d+)?\s*%?\s*"
    r"(?:(?:-|–|to|,)\s*[-+]?(?:\d[\d,]*)?\.?\d+\s*%?)?\s*\+?\s*[)\]]?$",
    re.ASCII,  # ASCII digits only: the script a digit is written in would be a choice no steward reads
)
_UNNAMED = re.compile(r"^Unnamed: \d+(?:_level_\d+)?$", re.ASCII)
_WORD = re.compile(r"[^\W_]+")


def normalise_label(text: Any) -> str:
    """How labels compare: NFC, case-folded, runs of white space as one space."""
    return " ".join(unicodedata.normalize("NFC", str(text)).casefold().split())


def spelling(text: Any) -> str:
    """A label as it is written (and released): NFC, runs of white space as one space, case kept."""
    return " ".join(unicodedata.normalize("NFC", str(text)).split())


TOTALS = frozenset({"All", "Total", "Overall", "Totals", "all", "total", "overall", "totals"})
"""How a total may be written: capitalised or in lower case (pandas' margins are ``All``)."""


@dataclass(frozen=True)
class Labels:
    """What text a table may hold: the catalogued categories and column names of the project's datasets and the
    project's own ``table_labels``. ``labels`` and ``words`` compare case-folded (is it a label at all?);
    ``spellings`` and ``spelt_words`` are the same texts as the catalogue writes them, which a released label
    must match: its case (and a letter that case-folds to another, the Kelvin sign to k) is otherwise a bit
    the steward cannot tell from a label."""

    labels: frozenset[str]
    words: frozenset[str]
    spellings: frozenset[str] = frozenset()
    spelt_words: frozenset[str] = frozenset()

    @classmethod
    def of(cls, texts: Iterable[Any]) -> Labels:
        texts = [t for t in texts if str(t).strip()]
        labels = frozenset(normalise_label(t) for t in texts)
        words = frozenset(w for t in labels for w in _WORD.findall(t)) | STATISTIC_WORDS
        spellings = frozenset(spelling(t) for t in texts)
        spelt: set[str] = {w for t in spellings for w in _WORD.findall(t)} | STATISTIC_WORDS
        forms = frozenset(form for w in spelt for form in (w, w.lower(), w.capitalize(), w.upper()))
        return cls(labels, words, spellings, forms)


def number_like(text: str) -> bool:
    """A number, percentage, range or bin written as text (``12``, ``3.5%``, ``1,204``, ``40-49``, ``90+``)."""
    return bool(_NUMBER_LIKE.match(text.strip()))


def is_label(text: Any, known: Labels, *, header: bool = False) -> bool:
    """A cell is a label when it is empty, a number written as text, a total, or one of the known labels; a
    header may also be made of known words (and pandas' ``Unnamed: 0`` for an unnamed index)."""
    s = normalise_label(text)
    if not s or s in known.labels or number_like(s) or s in ("all", "total", "overall", "totals"):
        return True
    if header:
        words = _WORD.findall(s)
        return bool(_UNNAMED.match(str(text).strip())) or (
            bool(words) and all(w in known.words or number_like(w) for w in words)
        )
    return False


def spelt_as_catalogued(text: Any, known: Labels, *, header: bool = False) -> bool:
    """Is a label (:func:`is_label` holds) written as the catalogue writes it: the spelling of a catalogued
    label or total, a number as its own digits, a header's words each as a label writes it, in lower case,
    capitalised or in capitals (``Mean age``, ``N``)?"""
    s = spelling(text)
    if not s or s in known.spellings or s in TOTALS or number_like(s):
        return True
    if header:
        words = _WORD.findall(s)
        return bool(_UNNAMED.match(s)) or (bool(words) and all(w in known.spelt_words or number_like(w) for w in words))
    return False


def with_index(df: pd.DataFrame) -> pd.DataFrame:
    """The table with a named or non-default index as ordinary columns (its labels are cells like any other)."""
    if isinstance(df.index, pd.RangeIndex) and df.index.name is None:
        return df
    return df.reset_index()


def header_texts(df: pd.DataFrame) -> list[str]:
    out: list[str] = []
    for c in df.columns:
        out.extend(str(x) for x in (c if isinstance(c, tuple) else (c,)))
    return out


def text_columns(df: pd.DataFrame) -> list[Any]:
    return [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])]


def check_labels(df: pd.DataFrame, known: Labels) -> dict[str, Any]:
    """Text in a table must be labels (:func:`is_label`); anything else is free text and fails."""
    df = with_index(df)
    headers = header_texts(df)
    bad_headers = [h for h in headers if not is_label(h, known, header=True)]
    respelt_headers = [h for h in headers if h not in bad_headers and not spelt_as_catalogued(h, known, header=True)]
    bad: list[dict[str, Any]] = []
    respelt: list[dict[str, Any]] = []
    count = respelt_count = 0

    def verdict(v: Any) -> str | None:
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            return None
        if not is_label(v, known):
            return "free"
        return "label" if spelt_as_catalogued(v, known) else "respelt"

    for col in text_columns(df):
        if pd.api.types.is_bool_dtype(df[col]):
            continue
        cells = df[col].tolist()
        for i, (v, what) in enumerate(zip(cells, once_per_value(cells, verdict), strict=True)):
            if what == "free":
                count += 1
                if len(bad) < MAX_CELLS_LISTED:
                    bad.append({"row": i, "column": str(col), "value": str(v)[:100]})
            elif what == "respelt":
                respelt_count += 1
                if len(respelt) < MAX_CELLS_LISTED:
                    respelt.append({"row": i, "column": str(col), "value": str(v)[:100]})
    if respelt_count or respelt_headers:
        return result(
            "labels",
            "fail",
            f"{respelt_count} text cell(s) and {len(respelt_headers)} header(s) are labels written otherwise than "
            "the catalogue writes them (in case, or with a letter that only case-folds to one of its letters): "
            "a label leaves as it is written, so write each one as the catalogue does"
            + (
                f"; and {count} cell(s) and {len(bad_headers)} header(s) are not labels at all"
                if count or bad_headers
                else ""
            ),
            cells=bad,
            respelt=respelt,
            headers=[h[:100] for h in bad_headers[:MAX_CELLS_LISTED]],
            respelt_headers=[h[:100] for h in respelt_headers[:MAX_CELLS_LISTED]],
            known_labels=len(known.labels),
        )
    if count or bad_headers:
        return result(
            "labels",
            "fail",
            f"{count} text cell(s) and {len(bad_headers)} header(s) are not labels of the project's catalogue "
            "or allow-list: tables carry counts and statistics under category labels, never free text; "
            "use the catalogued categories, or ask the stewards to add the label to the project's table_labels",
            cells=bad,
            headers=[h[:100] for h in bad_headers[:MAX_CELLS_LISTED]],
            known_labels=len(known.labels),
        )
    return result(
        "labels",
        "pass",
        "every text cell and header is a catalogued category, an allowed label or a number, written as the "
        "catalogue writes it",
        known_labels=len(known.labels),
    )


def table_text(df: pd.DataFrame) -> bytes:
    """The table rendered as CSV from its parsed values (index and headers included): what the row detection
    reads, whatever the file's own layout."""
    text: str = with_index(df).to_csv(index=False)
    return text.encode("utf-8")
