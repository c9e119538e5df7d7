"""Checks on a table's content: labels, not free text; no patient rows, found by content; no small group by
differencing with earlier releases. Attacks are tried for real against published, indexed datasets."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time

import numpy as np
import pandas as pd
import pytest

from paitient.channel import ChannelError
from paitient.ops.demodata import publish_demo
from paitient.rules import differencing as dif
from paitient.rules import disclosure, review
from paitient.services.data import keys
from tests.airlock.helpers import GOOD, STEWARD, csv_bytes, registry_counts, submit, wait_state


def by_check(airlock, rid: str) -> dict:
    return {c["check"]: c for c in airlock.store.checks(rid)}


# ---------------------------------------------------------------------------------------------------
# The pure rules

LABELS = disclosure.Labels.of(["F", "M", "sex", "age", "40-49", "Stage I"])


@pytest.mark.parametrize(
    ("text", "header", "ok"),
    [
        ("F", False, True),
        ("  stage   i ", False, True),  # case and spacing do not matter
        ("1,204", False, True),  # numbers written as text
        ("12.5%", False, True),
        ("90+", False, True),
        ("(40, 50]", False, True),
        ("Total", False, True),
        ("P-LGVLFVU6FADIJTQS", False, False),  # a pseudonym
        ("1984-07-19", False, False),  # a date is not a label
        ("Anna Müller", False, False),
        ("mean_age", True, True),  # a header of known words
        ("n patients (%)", True, True),
        ("Unnamed: 0", True, True),  # pandas' name for an unnamed index
        ("mean_age", False, False),  # ... but a cell must be a label itself
        ("patient_P-LGVLFVU6FADIJTQS", True, False),
    ],
)
def test_what_counts_as_a_label(text, header, ok):
    assert disclosure.is_label(text, LABELS, header=header) is ok


def test_index_labels_and_headers_are_checked_like_cells():
    df = pd.DataFrame({"n": [12, 15]}, index=pd.Index(["F", "P-LGVLFVU6FADIJTQS"], name="sex"))
    r = disclosure.check_labels(df, LABELS)
    assert r["status"] == "fail"
    assert r["details"]["cells"] == [{"row": 1, "column": "sex", "value": "P-LGVLFVU6FADIJTQS"}]
    r = disclosure.check_labels(pd.DataFrame({"F": [12], "who knows": [3]}), LABELS)
    assert r["status"] == "fail" and r["details"]["headers"] == ["who knows"]
    assert disclosure.check_labels(pd.DataFrame({"sex": ["F", "M"], "n": [12, 15]}), LABELS)["status"] == "pass"


def test_a_filter_that_cannot_be_applied_says_what_to_write():
    for bad, says in [
        ("age < 90", "must map column names"),
        ({"age": {"under": 90}}, "conditions are in, not"),
        ({"age": {"<": "ninety"}}, "takes a number"),
        ({"sex": {"in": "F"}}, "takes a list"),
    ]:
        with pytest.raises(disclosure.TableError, match=says):
            disclosure.validate_filter(bad)
    data = pd.DataFrame({"age": [30, 95, 91, 50], "sex": ["F", "M", "F", "F"]})
    spec = disclosure.validate_filter({"age": {"<": 90}, "sex": "F"})
    assert disclosure.filter_mask(data, spec).tolist() == [True, False, False, True]
    assert disclosure.population(data, spec) == {"age": ("30", "50"), "sex": ("F",)}
    assert disclosure.population(data, {}) == {}


def cells(**counts: float) -> dict[frozenset, float]:
    return {frozenset({("band", k.replace("_", "-"))}): v for k, v in counts.items()}


def test_nested_populations_reveal_the_dropped_patients_cell_by_cell():
    everyone = dif.CountTable(cells(b0_44=100, b45_64=120, b65_=80), dataset="d", version=1, population={})
    but_old = dif.CountTable(cells(b0_44=100, b45_64=120, b65_=78), dataset="d", version=1, population={"age": ("1",)})
    found = dif.compare(but_old, [("r-all", everyone)], 10)
    assert [(f.kind, f.earlier, f.cell, f.count, f.sure) for f in found] == [
        ("nested", ("r-all",), (), 2.0, True),  # everyone: two fewer
        ("nested", ("r-all",), (("band", "b65-"),), 2.0, True),
    ]
    # the same populations, or a difference of at least the threshold, reveal nothing
    assert dif.compare(everyone, [("r", everyone)], 10) == []
    many_gone = dif.CountTable(cells(b0_44=90, b45_64=120, b65_=80), dataset="d", version=1, population={"age": ("1",)})
    assert dif.compare(many_gone, [("r-all", everyone)], 10) == []
    # another dataset is not compared
    other = dif.CountTable(everyone.facts, dataset="e", version=1, population={})
    assert dif.compare(but_old, [("r", other)], 10) == []
    # Another version holds other patients: everyone in version 2, one patient more than in version 1,
    # gives that patient's band, though each table counts everyone.
    later = dif.CountTable(cells(b0_44=100, b45_64=121, b65_=80), dataset="d", version=2, population={})
    found = dif.compare(later, [("r-v1", everyone)], 10)
    assert [(f.kind, f.earlier, f.cell, f.count, f.sure) for f in found] == [
        ("nested", ("r-v1",), (), 1.0, False),
        ("nested", ("r-v1",), (("band", "b45-64"),), 1.0, False),
    ]


def test_populations_are_compared_by_the_rows_they_hold_not_the_columns_their_filters_name():
    """'Everyone' written as a filter that lets every row through (stage not in [], which keeps the rows
    without a stage too) and 'everyone under 90' filter different columns, so by their filters neither
    lies within the other and the pair was never compared; the difference counts the two patients over 90.
    Each recipe's population is kept as the rows of the version it holds: the second lies within the first,
    and the filter that keeps everyone is everyone."""
    from paitient.services.airlock.checks import recipe_counts

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"sex": rng.choice(["F", "M"], 400), "age": rng.integers(20, 89, 400).astype(float),
                       "stage": rng.choice(["I", "II", "III", "IV"], 400).astype(object)})  # fmt: skip
    df.loc[:1, "age"] = [93.0, 95.0]
    df.loc[5:9, "stage"] = None
    base = {"dataset": "counts", "version": 1, "index": ["sex"], "columns": [], "aggfunc": "count"}
    everyone = recipe_counts(df, disclosure.validate_recipe({**base, "filter": {"stage": {"not": []}}}))
    under_90 = recipe_counts(df, disclosure.validate_recipe({**base, "filter": {"age": {"<": 90}}}))
    plain = recipe_counts(df, disclosure.validate_recipe(base))
    assert set(everyone.population) == {"stage"} and set(under_90.population) == {"age"}
    for first, then in ((everyone, under_90), (under_90, everyone)):
        found = [(f.kind, f.cell, f.count, f.sure) for f in dif.compare(then, [("r1", first)], 10)]
        gone = sorted(df.sex[:2])
        by_sex = [("nested", (("sex", s),), 1.0 if gone[0] != gone[1] else 2.0, True) for s in sorted(set(gone))]
        assert found == [("nested", (), 2.0, True), *by_sex]
    assert dif.compare(plain, [("r1", everyone)], 10) == []  # one population, however the filter is written
    assert dif.CountTable.from_json(json.loads(json.dumps(under_90.to_json()))) == under_90


def one(var, **counts):
    return {frozenset({(var, k.replace("_", "-"))}): float(n) for k, n in counts.items()}


def test_bins_are_compared_beside_other_variables_across_versions_and_past_a_missing_group():
    """Bands 0-44 and 0-43 of one population: the piece between (the 4 patients aged 44) was found only
    when neither table had another variable, both were of one version and neither counted a missing age.
    Each variable's bins are now compared alone (the others added up), across versions, without the
    missing-value group (which is no bin)."""
    bands = one("age_band", **{"0_44": 100, "45_64": 80, "65+": 100})
    sexed = {
        frozenset({("age_band2", b), ("sex", s)}): n / 2
        for b, n in (("0-43", 96), ("44-64", 84), ("65+", 100))
        for s in ("F", "M")
    }
    first = dif.CountTable(bands, dataset="d", version=1, population={})
    beside = [(f.kind, f.cell, f.count) for f in dif.compare(dif.CountTable(sexed, "d", 1, {}), [("a", first)], 10)]
    assert ("bins", (("age_band2/age_band", "[44, 45)"),), 4.0) in beside
    later = dif.CountTable(one("age_band2", **{"0_43": 96, "44_64": 84, "65+": 100}), "d", 2, {})
    across = [(f.kind, f.cell, f.count, f.sure) for f in dif.compare(later, [("a", first)], 10)]
    assert across == [("bins", (("age_band2/age_band", "[44, 45)"),), 4.0, False)]
    missing = {frozenset({("age_band", "nan")}): 12.0}
    with_nan = dif.CountTable({**bands, **missing}, "d", 1, {})
    then = dif.CountTable({**one("age_band2", **{"0_43": 96, "44_64": 84, "65+": 100}), **missing}, "d", 1, {})
    assert [(f.kind, f.count) for f in dif.compare(then, [("a", with_nan)], 10)] == [("bins", 4.0)]


def test_a_wide_or_stacked_table_without_a_recipe_is_compared_on_each_of_its_groupings():
    """Patients under 90 by age band and sex, written wide (F and M as count columns) or as a stacked
    'Table 1' (age band rows, then sex rows), released by a steward; then everyone by sex from a recipe.
    The wide table's headers are the categories of sex, and each grouping of the stacked one is compared:
    both give the two patients over 90 (one F, one M) and send the second to a steward."""
    columns = {"age_band": ["0-44", "45-64", "65+"], "sex": ["F", "M"], "age": []}
    wide = dif.CountTable(
        {
            frozenset({("age_band", b), (dif.COLUMNS_VARIABLE, s)}): n
            for b, n in (("0-44", 50.0), ("45-64", 40.0), ("65+", 50.0))
            for s in ("F", "M")
        }
    )
    stacked = dif.CountTable({**one("age_band", **{"0_44": 100, "45_64": 80, "65+": 100}), **one("sex", F=140, M=140)})
    everyone = dif.CountTable(one("sex", F=141, M=141), dataset="counts", version=1, population={})
    for earlier in (dif.in_dataset_terms(wide, columns), dif.in_dataset_terms(stacked, columns)):
        found = [(f.kind, f.cell, f.count, f.sure) for f in dif.compare(everyone, [("r1", earlier)], 10)]
        assert {("nested", (("sex", "F"),), 1.0, False), ("nested", (("sex", "M"),), 1.0, False)} <= set(found)


def test_tables_without_recipes_that_look_nested_go_to_a_steward():
    a, b = dif.CountTable(cells(x=100, y=50)), dif.CountTable(cells(x=97, y=50))
    [f] = dif.compare(b, [("r1", a)], 10)
    assert (f.kind, f.count, f.sure) == ("nested", 3.0, False)


def test_a_total_minus_its_subgroups_reveals_the_group_left_out():
    total = {frozenset(): 60.0}
    sub = {frozenset({("sex", "F")}): 31.0, frozenset({("sex", "M")}): 25.0}
    [own] = dif.compare(dif.CountTable({**total, **sub}), [], 10)  # a suppressed cell, recoverable from the total
    assert (own.kind, own.earlier, own.cell, own.count, own.sure) == ("margin", (), (("sex", "not F, M"),), 4.0, True)
    # across releases over the same population
    first = dif.CountTable(total, dataset="d", version=1, population={})
    second = dif.CountTable(sub, dataset="d", version=1, population={})
    [f] = dif.compare(second, [("r-total", first)], 10)
    assert (f.kind, f.earlier, f.count, f.sure) == ("margin", ("r-total",), 4.0, True)


def test_overlapping_bins_reveal_the_pieces_between_their_edges():
    assert dif.parse_bin("40-49") == (40, 50) and dif.parse_bin("90+") == (90, np.inf)
    assert dif.parse_bin("(40, 50]") == (41, 51) and dif.parse_bin("<18") == (-np.inf, 18)
    assert dif.parse_bin("F") is None
    tens = dif.CountTable({frozenset({("age", "40-49")}): 30.0, frozenset({("age", "50-59")}): 30.0})
    shifted = dif.CountTable({frozenset({("age", "40-44")}): 28.0, frozenset({("age", "45-59")}): 32.0})
    [f] = dif.compare(shifted, [("r-tens", tens)], 10)
    assert (f.kind, f.earlier, f.cell, f.count) == ("bins", ("r-tens",), (("age", "[45, 50)"),), 2.0)
    # pieces of at least the threshold are fine
    wide = dif.CountTable({frozenset({("age", "40-44")}): 15.0, frozenset({("age", "45-59")}): 45.0})
    assert dif.compare(wide, [("r-tens", tens)], 10) == []


def test_bins_with_a_unit_are_read_as_bins_and_compared_only_on_the_same_scale():
    assert dif.parse_bin("45-64 years") == (45, 65) and dif.bin_unit("45-64 years") == "year"
    assert dif.parse_bin("65+ yrs") == (65, np.inf) and dif.bin_unit("65+ yrs") == "year"
    assert dif.parse_bin("< 18 y") == (-np.inf, 18) and dif.parse_bin("20-25 kg/m2") == (20, 26)
    assert dif.parse_bin("years") is None and dif.parse_bin("2019") is None and dif.bin_unit("40-49") == ""
    tens = dif.CountTable({frozenset({("age", "40-49 years")}): 30.0, frozenset({("age", "50-59 years")}): 30.0})
    shifted = dif.CountTable({frozenset({("age", "40-44 yrs")}): 28.0, frozenset({("age", "45-59 yrs")}): 32.0})
    [f] = dif.compare(shifted, [("r-tens", tens)], 10)
    assert (f.kind, f.cell, f.count) == ("bins", (("age", "[45, 50)"),), 2.0)
    # the same variable without its unit is the same scale
    [f] = dif.compare(dif.CountTable({frozenset({("age", "40-44")}): 28.0, frozenset({("age", "45-59")}): 32.0}),
                      [("r-tens", tens)], 10)  # fmt: skip
    assert (f.kind, f.cell, f.count) == ("bins", (("age", "[45, 50)"),), 2.0)
    # a unit no list knows, or spelt another way, hides nothing: taken as the variable's scale, under another
    # header too; with a total row spelt out, and a group that is not a bin, beside the bins
    for unit in ("yo", "y.o.", "Jahre", "years-old", "yrs."):
        other = dif.CountTable(
            {
                frozenset({("Age", f"40-44 {unit}")}): 28.0,
                frozenset({("Age", f"45-59 {unit}")}): 32.0,
                frozenset({("Age", "unknown")}): 3.0,
            }
        )
        [f] = dif.compare(other, [("r-tens", tens)], 10)
        assert (f.kind, f.cell, f.count) == ("bins", (("Age/age", "[45, 50)"),), 2.0), unit
    frame = pd.DataFrame({"age": ["40-44 years", "45-59 years", "All ages"], "n": [28, 32, 60]})
    [f] = dif.compare(dif.from_frame(frame, ["n"], ["age"]), [("r-tens", tens)], 10)
    assert (f.kind, f.cell, f.count) == ("bins", (("age", "[45, 50)"),), 2.0)
    # months are not years, and one table's bins in two units of time are not one scale
    months = dif.CountTable({frozenset({("age", "40-44 months")}): 28.0, frozenset({("age", "45-59 months")}): 32.0})
    assert dif.compare(months, [("r-tens", tens)], 10) == []
    mixed = dif.CountTable({frozenset({("age", "40-44 months")}): 28.0, frozenset({("age", "45-59 years")}): 32.0})
    assert dif.compare(mixed, [("r-tens", tens)], 10) == []


def test_a_total_row_is_read_as_a_margin_however_it_is_spelt():
    for total in ("Total", "Grand total", "All ages", "Sum", "Total patients", "ALL"):
        frame = pd.DataFrame({"age_band": ["0-44", "45-64", total], "n": [50, 47, 100]})  # 3 people left out
        [f] = dif.compare(dif.from_frame(frame, ["n"], ["age_band"]), [], 10)
        assert (f.kind, f.cell, f.count) == ("margin", (("age_band", "not 0-44, 45-64"),), 3.0), total
    # a category that only begins like a total is a category
    assert not dif.is_total("Total knee replacement") and not dif.is_total("all-cause")


def test_two_of_the_datasets_binned_columns_recomputed_from_recipes_are_two_quantities():
    """Bins of age and of BMI over the same people are not one scale: no 'difference' between them holds a
    colleague's recipe table back. A table without a recipe, under a header no column has, is still
    compared with every binned column."""

    def recomputed(var: str, counts: dict[str, float]) -> dif.CountTable:
        return dif.CountTable({frozenset({(var, k)}): v for k, v in counts.items()}, dataset="counts", version=1,
                              population={}, domains={var: tuple(counts)})  # fmt: skip

    age = recomputed("age_band", {"0-29": 100, "30-59": 500, "60+": 400})
    bmi = recomputed("bmi_band", {"0-24": 95, "25-34": 600, "35+": 305})
    assert dif.compare(bmi, [("r-age", age)], 10) == []
    written = dif.CountTable({frozenset({("BMI", k)}): v for k, v in {"0-24": 95, "25-34": 600, "35+": 305}.items()})
    [f] = dif.compare(written, [("r-age", age)], 10)
    assert (f.kind, f.cell, f.count) == ("bins", (("BMI/age_band", "[25, 30)"),), 5.0)


def test_a_steward_sees_each_difference_beside_the_tables_it_is_taken_from():
    everyone = dif.CountTable(cells(b0_44=100, b45_64=120, b65_=80), dataset="d", version=1, population={})
    but_old = dif.CountTable(cells(b0_44=100, b45_64=120, b65_=78), dataset="d", version=1, population={"age": ("1",)})
    [view] = dif.side_by_side(but_old, [("r-all", everyone)], 10)
    assert view.earlier == ("r-all",) and view.hidden == 0
    assert [(r.cell, r.before, r.now, r.difference, r.flagged) for r in view.rows] == [
        ("everyone", 300.0, 298.0, -2.0, True),  # the totals: two fewer
        ("band = b0-44", 100.0, 100.0, 0.0, False),
        ("band = b45-64", 120.0, 120.0, 0.0, False),
        ("band = b65-", 80.0, 78.0, -2.0, True),  # the two dropped patients are all in this cell
    ]
    assert [f.group() for f in view.findings] == ["everyone", "band = b65-"]
    # nothing found, nothing to show
    assert dif.side_by_side(everyone, [("r", everyone)], 10) == []


def test_a_margin_difference_flags_the_total_and_its_sub_cells_only():
    total = {frozenset(): 60.0}
    sub = {frozenset({("sex", "F")}): 31.0, frozenset({("sex", "M")}): 25.0}
    other = {frozenset({("site", "A")}): 40.0, frozenset({("site", "B")}): 20.0}  # a full split of the 60
    [within] = dif.side_by_side(dif.CountTable({**total, **sub, **other}), [], 10)
    assert within.earlier == ()
    assert {r.cell: r.flagged for r in within.rows} == {
        "everyone": True,
        "sex = F": True,
        "sex = M": True,
        "site = A": False,
        "site = B": False,
    }
    assert [(f.group(), f.count) for f in within.findings] == [("sex = not F, M", 4.0)]
    # across releases: the earlier total beside the new sub-cells
    first = dif.CountTable(total, dataset="d", version=1, population={})
    [across] = dif.side_by_side(dif.CountTable(sub, dataset="d", version=1, population={}), [("r1", first)], 10)
    assert [(r.cell, r.before, r.now, r.flagged) for r in across.rows] == [
        ("everyone", 60.0, None, True),
        ("sex = F", None, 31.0, True),
        ("sex = M", None, 25.0, True),
    ]


def test_overlapping_bins_flag_the_bins_around_the_piece():
    tens = dif.CountTable({frozenset({("age", f"{a}-{a + 9}")}): 30.0 for a in (30, 40, 50)})
    shifted = dif.CountTable(
        {
            frozenset({("age", "30-39")}): 30.0,
            frozenset({("age", "40-44")}): 28.0,
            frozenset({("age", "45-59")}): 32.0,
        }
    )
    [view] = dif.side_by_side(shifted, [("r-tens", tens)], 10)
    # rows in bin order; the bins that overlap the piece [45, 50) are flagged, the others not
    assert [(r.cell, r.before, r.now, r.flagged) for r in view.rows] == [
        ("age = 30-39", 30.0, 30.0, False),
        ("age = 40-44", None, 28.0, False),
        ("age = 40-49", 30.0, None, True),
        ("age = 45-59", None, 32.0, True),
        ("age = 50-59", 30.0, None, False),
    ]
    assert [(f.group(), f.count) for f in view.findings] == [("age = [45, 50)", 2.0)]


def test_a_long_comparison_keeps_every_flagged_row():
    old = dif.CountTable({frozenset({("id", f"{i:04d}")}): 50.0 for i in range(500)})
    new = dif.CountTable({**old.facts, frozenset({("id", "0499")}): 47.0})
    [view] = dif.side_by_side(new, [("r", old)], 10, max_rows=20)
    assert len(view.rows) == 20 and view.hidden == 480
    assert [r.cell for r in view.rows if r.flagged] == ["id = 0499"]


def test_a_count_table_survives_its_json_form():
    t = dif.CountTable(
        cells(a=1, b=2), dataset="d", version=3, population={"age": ("1", "2")}, domains={"band": ("a",)}
    )
    assert dif.CountTable.from_json(t.to_json()) == t


def facts_row_by_row(df: pd.DataFrame, counts: list[str], labels: list[str]) -> dict:
    """The facts of a table read one pandas row at a time (how from_frame once read them): the reference."""
    facts: dict = {}
    for _, row in df.iterrows():
        pairs = set()
        for col in labels:
            v = row[col]
            if v is None or (isinstance(v, float) and np.isnan(v)):
                continue
            if dif._category(v).casefold() not in dif.TOTAL_LABELS:
                pairs.add((dif._category(col), dif._category(v)))
        for col in counts:
            n = row[col]
            if n is None or (isinstance(n, float) and np.isnan(n)):
                continue
            key = set(pairs)
            if len(counts) > 1 and dif._category(col).casefold() not in dif.TOTAL_LABELS:
                key.add((dif.COLUMNS_VARIABLE, dif._category(col)))
            facts.setdefault(frozenset(key), float(n))
    return facts


def test_a_table_read_column_by_column_has_the_facts_of_its_rows():
    df = pd.DataFrame(
        {
            "sex": ["F", "M", "Total", None, "F", "M", " F ", "F"],
            "band": [1.0, 2.0, 2.0, 1.0, np.nan, 3.5, 1.0, 1.0],  # whole floats are the categories of integers
            "flag": [1, True, 1.0, "1", 0, False, 0.0, 1],  # equal values, other categories: 1 and True
            "n": [12, 30, 42, 7, 9, 11, 12, 99],  # the last row repeats a key: the first count stays
            "All": [np.nan, 31.0, 43.0, 8.0, 10.0, 12.0, 13.0, 5.0],
        }
    )
    numeric = df[["band", "n", "All"]]  # a row of numbers only comes out of pandas as floats
    for frame, label_sets in ((df, (["sex", "band", "flag"], ["band"], [])), (numeric, (["band"], []))):
        for counts in (["n"], ["n", "All"]):
            for labels in label_sets:
                assert dif.from_frame(frame, counts, labels).facts == facts_row_by_row(frame, counts, labels)
    assert dif.from_frame(df, ["n"], ["sex", "flag"]).facts[frozenset({("sex", "F"), ("flag", "1")})] == 12.0
    assert frozenset({("sex", "M"), ("flag", "True")}) in dif.from_frame(df, ["n"], ["sex", "flag"]).facts


# ---------------------------------------------------------------------------------------------------
# Attacks, for real


@pytest.fixture
def demo(site):
    """oncology/breast_cancer published through the real ingest: pseudonyms, catalogue, row index.

    Under a fixed pseudonym key: rows are published in an order keyed by it (never the export's), and the
    tests take rows by position, so under a new key each run they would read other rows each time."""
    site.key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys.create_once(site.key_file, hashlib.sha256(b"paitient airlock tests: demo pseudonym key").digest())
    assert publish_demo(site) == ["oncology/breast_cancer@v1"]
    return pd.read_parquet(site.data_root / "oncology" / "breast_cancer" / "current" / "data.parquet")


def test_a_column_of_pseudonyms_is_refused_as_patient_rows_and_as_free_text(airlock, people, demo):
    table = pd.DataFrame({"age": ["50-59"] * 20, "who": demo["patient"][:20], "n": [12] * 20})
    rid = submit(airlock, people, "alice", csv_bytes(table))
    wait_state(airlock, rid, review.IN_REVIEW)
    checks = by_check(airlock, rid)
    assert checks["row_content"]["status"] == "fail"
    assert checks["row_content"]["details"]["rows"] == {"oncology/breast_cancer": 20}
    assert "20 of oncology/breast_cancer" in checks["row_content"]["reason"]
    assert checks["labels"]["status"] == "fail"
    assert [c["value"] for c in checks["labels"]["details"]["cells"]] == list(demo["patient"][:20])
    assert checks["labels"]["details"]["headers"] == ["who"]  # "age" and "50-59" are catalogued
    assert airlock.describe(airlock.store.get(rid), for_steward=False)["overall"] == "fail"


def test_patient_rows_under_other_names_are_found_by_their_values(airlock, people, demo):
    rows = demo[["mean radius", "mean texture", "mean perimeter", "mean area"]][:15]
    summary = rows.set_axis(["stage", "I", "II", "III"], axis=1)  # innocent names (the project's allow-list)
    rid = submit(airlock, people, "alice", csv_bytes(summary), name="summary.csv")
    wait_state(airlock, rid, review.IN_REVIEW)
    checks = by_check(airlock, rid)
    assert checks["row_level"]["status"] == "pass"  # no column name matches the dataset's ...
    assert checks["labels"]["status"] == "pass"  # ... and no text in it ...
    assert checks["row_content"]["status"] == "fail"  # ... but its lines are 15 patients' rows
    assert checks["row_content"]["details"]["rows"] == {"oncology/breast_cancer": 15}


def test_an_other_output_is_read_whole_by_the_checks_and_the_steward(site, airlock, people, demo):
    """Kind ``other`` has no disclosure check of its own, and a steward judged it from a preview of its first
    20,000 characters. A kernel files a text whose first 20,000 characters are prose and whose tail is
    patient rows; and the same rows as a table, whose preview shows 20 rows."""
    from paitient.services.airlock.canonical import TEXT_MAX_CHARS

    prose = ("The model's calibration is adequate across age bands. " * 400)[:20_000]
    rows = demo[["patient", "mean radius", "mean texture", "mean perimeter"]][40:80].to_csv(index=False)
    rid = submit(airlock, people, "alice", (prose + "\n" + rows).encode(), kind="other", name="notes.txt")
    wait_state(airlock, rid, review.IN_REVIEW)
    checks = by_check(airlock, rid)
    assert checks["manual_review"]["status"] == "review"
    assert checks["row_content"]["status"] == "fail"
    assert checks["row_content"]["details"]["rows"] == {"oncology/breast_cancer": 40}
    assert checks["row_content"]["reason"].startswith("the text holds patient rows (40 of oncology/breast_cancer)")

    table = demo[["mean radius", "mean texture", "mean perimeter", "mean area"]][:150]
    rid = submit(airlock, people, "alice", csv_bytes(table), kind="other", name="appendix.csv")
    wait_state(airlock, rid, review.IN_REVIEW)
    checks = by_check(airlock, rid)
    assert checks["row_content"]["status"] == "fail" and checks["row_level"]["status"] == "pass"  # 4 of 32 columns
    assert checks["row_content"]["details"]["rows"] == {"oncology/breast_cancer": 150}
    # Rows the checks cannot match (each value moved a little) are what the steward reads: all of them.
    moved = pd.concat([table[:20], demo[["mean radius", "mean texture"]][20:150] + 0.001], ignore_index=True)
    rid = submit(airlock, people, "alice", csv_bytes(moved), kind="other", name="moved.csv")
    wait_state(airlock, rid, review.IN_REVIEW)
    shown = airlock.previews.show(rid, username="sam", scopes=set(STEWARD), via="page")
    assert shown.table.total_rows == len(shown.table.rows) == 150
    longer = demo[["mean radius"]][:201] + 0.001
    with pytest.raises(ChannelError, match="a steward reads it whole, so it may have at most 200 rows") as e:
        submit(airlock, people, "alice", csv_bytes(longer), kind="other", name="longer.csv")
    assert e.value.code == "refused"

    # A text the steward cannot read whole is refused at the request; one that fits is previewed whole.
    long = ("x" * 99 + "\n") * (TEXT_MAX_CHARS // 100 + 1)
    with pytest.raises(ChannelError, match=f"more than the {TEXT_MAX_CHARS} a steward reads whole") as e:
        submit(airlock, people, "alice", long.encode(), kind="other", name="long.txt")
    assert e.value.code == "refused"
    fits = prose * 4
    rid = submit(airlock, people, "alice", fits.encode(), kind="other", name="fits.txt")
    wait_state(airlock, rid, review.IN_REVIEW)
    assert by_check(airlock, rid)["row_content"]["status"] == "pass"
    shown = airlock.previews.show(rid, username="sam", scopes=set(STEWARD), via="page")
    assert shown.text == fits and not shown.truncated


def test_an_aggregate_by_catalogued_categories_passes_the_content_checks(airlock, people, demo):
    counts = demo.groupby("age").size().rename("n").reset_index()
    recipe = {"dataset": "breast_cancer", "index": ["age"], "aggfunc": "count"}
    rid = submit(airlock, people, "alice", csv_bytes(counts), recipe=recipe)
    wait_state(airlock, rid, review.IN_REVIEW)
    checks = by_check(airlock, rid)
    assert checks["labels"]["status"] == "pass" and checks["labels"]["details"]["known_labels"] > 10
    assert checks["row_content"]["status"] == "pass"
    assert checks["recipe"]["status"] == "pass"
    assert checks["differencing"]["status"] == "pass"


def test_counts_for_all_but_two_patients_are_refused_naming_the_earlier_release(site, airlock, people):
    df = registry_counts(site)
    everyone = df.groupby("age_band").size().rename("n").reset_index()
    recipe = {"dataset": "counts", "index": ["age_band"], "aggfunc": "count"}
    first = submit(airlock, people, "ren", csv_bytes(everyone), recipe=recipe)
    wait_state(airlock, first, review.RELEASED)  # every check passed: released automatically
    assert airlock.tables.released("registry") == [first]

    young = df[df.age < 90].groupby("age_band").size().rename("n").reset_index()
    assert young.n.min() >= 10  # each cell alone is large enough
    second = submit(airlock, people, "ren", csv_bytes(young), recipe={**recipe, "filter": {"age": {"<": 90}}})
    wait_state(airlock, second, review.IN_REVIEW)
    checks = by_check(airlock, second)
    assert checks["minimum_count"]["status"] == "pass" and checks["recipe"]["status"] == "pass"
    diff = checks["differencing"]
    assert diff["status"] == "fail"
    assert f"nested populations with request {first}" in diff["reason"]
    assert diff["details"]["findings"] == [
        {"kind": "nested", "earlier": [first], "cell": {}, "count": 2.0, "sure": True},  # everyone: two fewer
        {"kind": "nested", "earlier": [first], "cell": {"age_band": "65+"}, "count": 2.0, "sure": True},
    ]
    assert airlock.store.get(second).state == review.IN_REVIEW  # not released automatically

    # The same table without its recipe: the population is not known, so a steward judges.
    third = submit(airlock, people, "ren", csv_bytes(young))
    wait_state(airlock, third, review.IN_REVIEW)
    diff = by_check(airlock, third)["differencing"]
    assert diff["status"] == "review" and first in diff["details"]["earlier"]
    assert {"age_band": "65+"} in [f["cell"] for f in diff["details"]["findings"]]


def test_a_table_of_counts_the_kernel_made_up_is_not_released_without_a_steward(site, airlock, people):
    """A project releases tables automatically. A kernel writes nine patients' ages (each plus 10, so no count
    is small) as the counts of a table of catalogued labels: every check of the table alone passes, because
    nothing ties the numbers to the data. Only a table its recipe recomputed is released automatically; this
    one waits for a steward."""
    df = registry_counts(site)
    ages = df.age.to_numpy()[:9]
    counts = (ages + 10).reshape(3, 3)
    made_up = pd.DataFrame(counts, columns=["age", "sex", "age_band"], index=pd.Index(["0-44", "45-64", "65+"]))
    made_up = made_up.rename_axis("age_band").reset_index(names="band")
    rid = submit(airlock, people, "ren", csv_bytes(made_up))
    wait_state(airlock, rid, review.IN_REVIEW)
    checks = by_check(airlock, rid)
    assert {c: v["status"] for c, v in checks.items()} == {
        "published_copy": "pass",
        "row_level": "pass",
        "labels": "pass",
        "row_content": "pass",
        "minimum_count": "pass",
        "zeros": "pass",
        "dominance": "pass",
        "differencing": "pass",
        "canonical": "pass",
    }
    airlock.wait_idle()
    assert airlock.store.get(rid).state == review.IN_REVIEW
    moved = airlock.store.events(rid, "state")[-1].data
    assert moved["to"] == review.IN_REVIEW and "automatic" not in moved
    assert "recipe" in moved["not_automatic"]

    # The same cells with the recipe that makes them fail the recipe check; the true counts pass and leave
    # once a steward rejected the made-up ones (while they wait, their cells, labelled as the dataset's age
    # bands, are compared with every later table of the project).
    recipe = {"dataset": "counts", "index": ["age_band"], "aggfunc": "count"}
    forged = submit(airlock, people, "ren", csv_bytes(made_up), recipe=recipe)
    wait_state(airlock, forged, review.IN_REVIEW)
    assert by_check(airlock, forged)["recipe"]["status"] == "fail"
    for made in (rid, forged):
        airlock.decide(made, username="sam", scopes=set(STEWARD), action="reject", comment="numbers made up")
    true = df.groupby("age_band").size().rename("n").reset_index()
    rid = submit(airlock, people, "ren", csv_bytes(true), recipe=recipe)
    wait_state(airlock, rid, review.RELEASED)
    assert airlock.store.events(rid, "state")[-1].data["automatic"] is True


def test_what_leaves_without_a_steward_is_the_airlocks_own_table(site, airlock, people):
    """The recipe check compares numbers, not text, layout or empty rows: a kernel adds a column of patients'
    values and rows without numbers to the true counts under a kernel-chosen file name, and the recipe
    passes. What leaves without a steward is the airlock's own computation of the recipe, under the request's
    id: none of the kernel's text, layout or name. Recipes that are not plain counts over catalogued
    populations go to a steward."""
    from paitient.services.airlock.checks import computed_table

    df = registry_counts(site)
    recipe = {"dataset": "counts", "index": ["age_band"], "aggfunc": "count"}
    counts = df.groupby("age_band").size().rename("n").reset_index()
    payload = [f"{a}-{a * 7 + 0.53:.2f}" for a in df.age[:40]]  # "number-like" text passes as a label
    padded = pd.concat([counts, pd.DataFrame({"age_band": ["0-44"] * 40, "n": [np.nan] * 40})], ignore_index=True)
    padded["band"] = ["x"] * 3 + payload
    padded["band"] = padded["band"].where(padded.index >= 3, "0-44")
    name = f"{payload[0]} {payload[1]}.csv"
    rid = submit(airlock, people, "ren", csv_bytes(padded), name=name, recipe=recipe)
    wait_state(airlock, rid, review.RELEASED)
    assert by_check(airlock, rid)["recipe"]["status"] == "pass"  # the numbers are the recipe's ...
    req = airlock.store.get(rid)
    released = airlock.store.read_blob(req.sha256).decode()
    assert released == computed_table(df, recipe).to_csv(index=False)  # ... and what left is the airlock's own
    assert released == "age_band,n\n" + "".join(f"{b},{n}\n" for b, n in zip(counts.age_band, counts.n, strict=True))
    assert payload[0] not in released and req.filename == f"{rid}.csv"
    shown = airlock.describe_for_requester(req)
    assert shown["filename"] == f"{rid}.csv" and payload[0] not in json.dumps(shown)
    moved = airlock.store.events(rid, "state")[-1].data
    assert moved["file"]["replaces"] == hashlib.sha256(csv_bytes(padded)).hexdigest()

    # A sum, and a count over a population a filter picked, wait for a steward.
    total = df.groupby("sex").age.sum().rename("age").reset_index()
    summed = submit(
        airlock, people, "ren", csv_bytes(total), recipe={**recipe, "index": ["sex"], "values": "age", "aggfunc": "sum"}
    )
    picked = {**recipe, "filter": {"age_band": {"in": ["0-44", "45-64", "65+", "Zq-7"]}}}
    chosen = submit(airlock, people, "ren", csv_bytes(counts), recipe=picked)
    for rid, says in ((summed, "only count tables leave without a steward"), (chosen, "filters its population")):
        wait_state(airlock, rid, review.IN_REVIEW)
        airlock.wait_idle()
        assert airlock.store.get(rid).state == review.IN_REVIEW
        assert says in airlock.store.events(rid, "state")[-1].data["not_automatic"], rid


def test_a_filtered_population_waits_for_a_steward_as_it_can_spell_a_patients_value(site, airlock, people):
    """The kernel reads every row, so a filter lets it choose a population whose count is whatever it wants:
    women aged below a threshold, of a list of ages, or of a list of ages written as text (which a catalogue
    may list as another integer column's categories), chosen so that the count is an over-90 patient's exact
    age less 80 (a group the minimum count protects); and which catalogued labels a filter keeps is a bit per
    label of its choosing. Every check of such tables passes, so none leaves without a steward, who reads
    the filter; the count table of the whole dataset still leaves by itself."""
    df = registry_counts(site)
    women = df[df.sex == "F"]
    recipe = {"dataset": "counts", "index": ["sex"], "aggfunc": "count"}
    k = int(df.age[df.age >= 90].max()) - 80
    threshold = next(float(t) for t in sorted(set(women.age)) if (women.age < t).sum() >= k)
    listed = sorted(women.age.unique().tolist())[:k]
    filters = {
        "threshold": ({"sex": ["F"], "age": {"<": threshold}}, women.age < threshold),
        "numbers": ({"sex": ["F"], "age": {"in": listed}}, women.age.isin(listed)),
        "text": ({"sex": ["F"], "age": {"in": [str(a) for a in listed]}}, women.age.isin(listed)),
        "labels": ({"sex": ["F"], "age_band": {"in": ["45-64", "65+"]}}, women.age_band.isin(["45-64", "65+"])),
    }
    requests = {}
    for how, (where, picked) in filters.items():
        table = pd.DataFrame({"sex": ["F"], "n": [int(picked.sum())]})
        requests[how] = submit(airlock, people, "ren", csv_bytes(table), recipe={**recipe, "filter": where})
    for how, rid in requests.items():
        wait_state(airlock, rid, review.IN_REVIEW)
        airlock.wait_idle()
        checks = by_check(airlock, rid)
        assert checks["recipe"]["status"] == "pass" and checks["minimum_count"]["status"] == "pass", how
        why = airlock.store.events(rid, "state")[-1].data["not_automatic"]
        on = "'age_band', 'sex'" if how == "labels" else "'age', 'sex'"  # in the validated recipe's order
        assert f"the recipe filters its population (on {on}): which people a filter picks" in why, why
        assert airlock.store.get(rid).state == review.IN_REVIEW
    # The whole dataset's counts still leave without a steward.
    whole = df.groupby("sex").size().rename("n").reset_index()
    wait_state(airlock, submit(airlock, people, "ren", csv_bytes(whole), recipe=recipe), review.RELEASED)


def test_the_airlocks_own_table_is_checked_again_before_it_leaves(site, airlock, people):
    """A categorical column with one missing value: the recipe's crosstab and ACRO leave that group out, so
    every check passes, but the airlock's own table keeps it as a cell of 1. That table is checked again,
    cell by cell, before it leaves: the request waits for a steward saying why."""
    from tests.airlock.helpers import publish_indexed

    n = 200
    stage = pd.Categorical(["I", "II"] * (n // 2) + [None], categories=["I", "II"])
    df = pd.DataFrame({"stage": stage, "sex": ["F", "M", "M", "F"] * (n // 4) + ["F"]})
    publish_indexed(site, "registry", "counts", df, categories={"stage": ["I", "II"], "sex": ["F", "M"]})
    recipe = {"dataset": "counts", "index": ["sex"], "columns": ["stage"], "aggfunc": "count"}
    table = pd.crosstab(df.sex, df.stage).reset_index()
    rid = submit(airlock, people, "ren", csv_bytes(table), recipe=recipe)
    wait_state(airlock, rid, review.IN_REVIEW)
    airlock.wait_idle()
    checks = by_check(airlock, rid)
    assert checks["recipe"]["status"] == "pass" and checks["minimum_count"]["status"] == "pass"
    why = airlock.store.events(rid, "state")[-1].data["not_automatic"]
    assert why.startswith("the table the airlock computed for release has 1 cell(s) under the minimum count"), why
    assert airlock.store.get(rid).state == review.IN_REVIEW


def test_a_researcher_has_at_most_auto_release_per_day_outputs_released_without_a_steward(site, airlock, people):
    """What leaves without a steward was chosen by the researcher's code (a recipe's dataset, grouping and
    format), a few bits a release that no steward reads: past the project's auto_release_per_day in 24 hours,
    an output that would have left automatically waits for a steward, saying from when they leave again. The
    count is the requester's own: a colleague's next one still leaves."""
    df = registry_counts(site)
    registry = site.project("registry").replace(auto_release_per_day=2)
    airlock.site = site.replace(projects=tuple(registry if p.name == "registry" else p for p in site.projects))
    recipe = {"dataset": "counts", "index": ["age_band"], "aggfunc": "count"}
    by_band = csv_bytes(df.groupby("age_band").size().rename("n").reset_index())
    by_sex = csv_bytes(df.groupby("sex").size().rename("n").reset_index())
    filed = [
        submit(airlock, people, "ren", by_band, recipe=recipe),
        submit(airlock, people, "ren", by_sex, recipe={**recipe, "index": ["sex"]}),
    ]
    for rid in filed:
        wait_state(airlock, rid, review.RELEASED)
    first_out = airlock.store.events(filed[0], "state")[-1].ts
    third = submit(airlock, people, "ren", by_band, recipe=recipe)
    wait_state(airlock, third, review.IN_REVIEW)
    airlock.wait_idle()
    assert airlock.store.get(third).state == review.IN_REVIEW
    assert {c["check"]: c["status"] for c in airlock.store.checks(third)}["recipe"] == "pass"
    again = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(first_out + 24 * 3600 + 60))
    assert airlock.store.events(third, "state")[-1].data["not_automatic"] == (
        "ren had 2 outputs of project registry released without review in the last 24 hours, as many as the "
        f"project allows (auto_release_per_day = 2): a steward reviews this one; outputs leave without review "
        f"again from {again}"
    )
    wait_state(airlock, submit(airlock, people, "steph", by_band, recipe=recipe, project="registry"), review.RELEASED)

    closed = site.project("registry").replace(auto_release_per_day=0)
    airlock.site = site.replace(projects=tuple(closed if p.name == "registry" else p for p in site.projects))
    none = submit(airlock, people, "steph", by_sex, recipe={**recipe, "index": ["sex"]}, project="registry")
    wait_state(airlock, none, review.IN_REVIEW)
    airlock.wait_idle()
    assert airlock.store.get(none).state == review.IN_REVIEW
    assert airlock.store.events(none, "state")[-1].data["not_automatic"] == (
        "project registry releases nothing without review (auto_release_per_day = 0)"
    )


def test_a_patient_added_in_a_new_version_is_not_released_by_counts_of_everyone(site, airlock, people):
    """Counts of everyone, left without a version, once before and once after a version that adds one
    patient: each table alone is safe, the two differ by that patient. The check reads the version `current`
    points to and compares the versions' tables, on the variables both have (a finer grouping of the new
    version too): the later ones wait for a steward, and what a steward would release is that version's."""
    import json as json_

    from paitient.services.data import rowindex
    from tests.airlock.helpers import AGES, publish

    df = registry_counts(site)
    recipe = {"dataset": "counts", "index": ["age_band"], "aggfunc": "count"}
    first = submit(airlock, people, "ren", csv_bytes(df.groupby("age_band").size().rename("n").reset_index()),
                   recipe=recipe)  # fmt: skip
    wait_state(airlock, first, review.RELEASED)
    later = pd.concat([df, pd.DataFrame({"age": [57], "age_band": ["45-64"], "sex": ["F"]})], ignore_index=True)
    where = publish(site, "registry", "counts", later, version=2)
    columns = [{"name": c, "action": "keep"} for c in later.columns]
    columns[1]["categories"], columns[2]["categories"] = ["0-44", "45-64", "65+"], ["F", "M"]
    (where / "manifest.json").write_text(json_.dumps({"version": 2, "columns": columns}))
    rowindex.reindex_version(site, "registry", "counts", 2, rowindex.ensure_key(site))
    link = site.data_root / "registry" / "counts" / "current"
    os.symlink("versions/2", link.with_name("current.new"))
    os.replace(link.with_name("current.new"), link)
    assert len(AGES) + 1 == len(later)

    by_band = later.groupby("age_band").size().rename("n").reset_index()
    again = submit(airlock, people, "ren", csv_bytes(by_band), recipe=recipe)
    by_both = later.groupby(["age_band", "sex"]).size().rename("n").reset_index()
    finer = submit(airlock, people, "ren", csv_bytes(by_both), recipe={**recipe, "index": ["age_band", "sex"]})
    for rid in (again, finer):
        wait_state(airlock, rid, review.IN_REVIEW)
        airlock.wait_idle()
        assert airlock.store.get(rid).state == review.IN_REVIEW
        checks = {c["check"]: c for c in airlock.store.checks(rid)}
        assert checks["recipe"]["status"] == "pass" and checks["recipe"]["details"]["version"] == 2
        assert checks["differencing"]["status"] == "review"
        cells = [(f["earlier"], f["cell"], f["count"]) for f in checks["differencing"]["details"]["findings"]]
        assert ([first], {"age_band": "45-64"}, 1.0) in cells, cells


def test_a_finer_grouping_of_everyone_does_not_hide_the_patients_a_released_filter_dropped(site, airlock, people):
    """A steward released the patients under 90 by age band (each cell large). Everyone by age band and sex,
    a recipe that would leave without a steward, adds up to everyone by age band: minus the first, the two
    patients over 90. It is compared on the variable both have, and refused naming the earlier release."""
    df = registry_counts(site)
    recipe = {"dataset": "counts", "index": ["age_band"], "aggfunc": "count", "filter": {"age": {"<": 90}}}
    young = df[df.age < 90].groupby("age_band").size().rename("n").reset_index()
    first = submit(airlock, people, "ren", csv_bytes(young), recipe=recipe)
    wait_state(airlock, first, review.IN_REVIEW)
    airlock.previews.show(first, username="sam", scopes=set(STEWARD), via="page")
    airlock.decide(first, username="sam", scopes=set(STEWARD), action="approve", comment="every cell over 10")
    assert airlock.store.get(first).state == review.RELEASED
    both = df.groupby(["age_band", "sex"]).size().rename("n").reset_index()
    assert both.n.min() >= 10
    rid = submit(airlock, people, "ren", csv_bytes(both), recipe={"dataset": "counts", "index": ["age_band", "sex"],
                                                                  "aggfunc": "count"})  # fmt: skip
    wait_state(airlock, rid, review.IN_REVIEW)
    airlock.wait_idle()
    assert airlock.store.get(rid).state == review.IN_REVIEW
    check = {c["check"]: c for c in airlock.store.checks(rid)}["differencing"]
    assert check["status"] == "fail"
    found = [(f["kind"], f["earlier"], f["cell"], f["count"], f["sure"]) for f in check["details"]["findings"]]
    assert found == [("nested", [first], {}, 2.0, True), ("nested", [first], {"age_band": "65+"}, 2.0, True)]


@pytest.mark.parametrize("header", ["AGE_BAND", "band"])
def test_a_table_without_a_recipe_is_compared_under_the_datasets_names(site, airlock, people, header):
    """A steward released the patients under 90 by age band from a table without a recipe, its header
    written ``AGE_BAND`` or ``band``. Everyone by ``age_band`` from a recipe would leave without a steward,
    and minus the first counts the two patients over 90. The first table's header is read as the dataset's
    column (by its name but for case, or by its labels, the categories of that column alone), so the two
    are compared: the second waits for a steward."""
    df = registry_counts(site)
    young = df[df.age < 90].groupby("age_band").size().rename("n").reset_index().rename(columns={"age_band": header})
    first = submit(airlock, people, "ren", csv_bytes(young))
    wait_state(airlock, first, review.IN_REVIEW)
    airlock.previews.show(first, username="sam", scopes=set(STEWARD), via="page")
    airlock.decide(first, username="sam", scopes=set(STEWARD), action="approve", comment="under 90, cells over 10")
    assert airlock.store.get(first).state == review.RELEASED
    everyone = df.groupby("age_band").size().rename("n").reset_index()
    rid = submit(airlock, people, "ren", csv_bytes(everyone), recipe={"dataset": "counts", "index": ["age_band"],
                                                                      "aggfunc": "count"})  # fmt: skip
    wait_state(airlock, rid, review.IN_REVIEW)
    airlock.wait_idle()
    assert airlock.store.get(rid).state == review.IN_REVIEW
    check = {c["check"]: c for c in airlock.store.checks(rid)}["differencing"]
    assert check["status"] == "review"
    found = [(f["kind"], f["earlier"], f["cell"], f["count"], f["sure"]) for f in check["details"]["findings"]]
    assert found == [("nested", [first], {"age_band": "65+"}, 2.0, False)]


def test_a_table_counts_as_released_only_with_its_request(site, airlock, people):
    df = registry_counts(site)
    by_sex = df.groupby("sex").size().rename("n").reset_index()
    rid = submit(airlock, people, "ren", csv_bytes(pd.concat([by_sex, pd.DataFrame({"sex": ["F"], "n": [3]})])))
    wait_state(airlock, rid, review.IN_REVIEW)  # fails (a cell of 3): kept, but not released
    assert airlock.tables.released("registry") == []
    assert [r for r, _, done in airlock.tables.earlier("registry", "other") if done] == []


def test_a_kernel_recipe_carries_its_filter_to_the_airlock():
    from paitient.kernel.airlock.spec import RequestSpecError, TableRecipe

    recipe = TableRecipe(dataset="counts", index="age_band", filter={"age": {"<": 90}})
    assert recipe.to_wire()["filter"] == {"age": {"<": 90}}
    assert TableRecipe.from_dict(recipe.to_wire()) == TableRecipe(**recipe.to_wire())
    with pytest.raises(RequestSpecError, match="takes a number"):
        TableRecipe(dataset="counts", index="age_band", filter={"age": {"<": "ninety"}})


def test_a_recipe_table_holds_the_recipes_numbers_under_their_labels_to_every_digit_written(airlock, people, demo):
    """The recipe check compared the table's numbers as a sorted multiset within a relative 1e-6: the 8th to
    16th significant digits of a table of means carried a patient's pseudonym, counts moved under other labels
    passed, and so did counts with decimals (209.000187). Each number is now compared with the recipe's cell
    under its own labels, exactly, or rounded to the decimals it is written with; a count is a whole number."""
    recipe = {"dataset": "breast_cancer", "index": ["age"], "columns": ["target"], "values": "mean area"}
    recipe = {**recipe, "aggfunc": "mean"}
    means = pd.crosstab(demo["age"], demo["target"], values=demo["mean area"], aggfunc="mean")
    secret = demo["patient"].iloc[0]
    digits = "".join(f"{ord(c):03d}" for c in secret)
    carried = means.to_numpy().ravel().copy()
    chunks = [digits[i : i + 6].ljust(6, "0") for i in range(0, len(digits), 6)]
    assert len(chunks) <= np.isfinite(carried).sum()
    for i, chunk in enumerate(chunks):  # 7 significant digits of the mean, then 6 of the pseudonym
        base = float(f"{carried[i]:.7g}")
        unit = 10 ** (np.floor(np.log10(abs(base))) - 7)
        carried[i] = base + (int(chunk) + 0.5) * unit * 1e-6
    assert np.allclose(carried, means.to_numpy().ravel(), rtol=1e-6, equal_nan=True)  # what passed before
    tables = {
        "digits": pd.DataFrame(carried.reshape(means.shape), index=means.index, columns=means.columns),
        "true": means,
        "rounded": means.round(2),
    }
    filed = {
        how: submit(airlock, people, "alice", csv_bytes(t.reset_index()), recipe=recipe) for how, t in tables.items()
    }

    counts = pd.crosstab(demo["age"], demo["target"])
    count_recipe = {"dataset": "breast_cancer", "index": ["age"], "columns": ["target"], "aggfunc": "count"}
    moved = counts.copy()
    moved.iloc[:, :] = counts.to_numpy().ravel()[::-1].reshape(counts.shape)  # the same numbers, other labels
    decimals = counts.astype(float)
    big = np.unravel_index(int(np.argmax(counts.to_numpy())), counts.shape)  # where 1e-6 covers the decimals
    assert counts.iloc[big] * 1e-6 > 0.00005
    decimals.iloc[big] += 0.00005
    for how, t in {"moved": moved, "decimals": decimals, "counts": counts}.items():
        filed[how] = submit(airlock, people, "alice", csv_bytes(t.reset_index()), recipe=count_recipe)

    # The table of notebooks/03-request-export.ipynb: a mean per age band, one column of numbers.
    by_age = demo.groupby("age")["mean radius"].mean().reset_index()
    by_age_recipe = {"dataset": "breast_cancer", "index": ["age"], "values": "mean radius", "aggfunc": "mean"}
    filed["notebook"] = submit(airlock, people, "alice", csv_bytes(by_age), recipe=by_age_recipe)

    for rid in filed.values():
        wait_state(airlock, rid, review.IN_REVIEW)
    got = {how: by_check(airlock, rid)["recipe"] for how, rid in filed.items()}
    assert {how: r["status"] for how, r in got.items()} == {
        "notebook": "pass",
        "digits": "fail",
        "true": "pass",
        "rounded": "pass",
        "moved": "fail",
        "decimals": "fail",
        "counts": "pass",
    }
    assert "differ from what the recipe recomputes under their labels" in got["digits"]["reason"]
    assert len(got["digits"]["details"]["cells"]) == len(chunks)
    assert got["decimals"]["details"]["cells"] == [
        {
            "row": int(big[0]),
            "column": str(counts.columns[big[1]]),
            "value": float(counts.iloc[big]) + 0.00005,
            "recipe": float(counts.iloc[big]),
        }
    ]
    assert "to every digit written" in got["true"]["reason"]
    # The released file of a passing table holds the recipe's numbers: nothing but them to the digits shown.
    blob = airlock.store.read_blob(airlock.store.get(filed["true"]).sha256)
    released = pd.read_csv(io.BytesIO(blob), float_precision="round_trip").set_index("age")
    assert np.array_equal(released.to_numpy(), means.to_numpy(), equal_nan=True)


def test_a_label_leaves_only_as_the_catalogue_writes_it(airlock, people):
    """Labels compare case-folded, so a table whose labels spelt a pseudonym in their case (``i``, ``II``,
    ``iIi``), or in letters that case-fold to a label's (the long s of ``ſtage``; the Kelvin sign, which is
    ``K`` once normalised), passed the labels check and left as written: a bit per letter. A text cell must
    now be written as the catalogue writes it; a header's words as the catalogue writes them, in lower case,
    capitalised or in capitals."""
    secret = b"P42"
    bits = [(b >> i) & 1 for b in secret for i in range(8)]
    labels = ["I", "II", "III", "IV"] * 6
    cased, k = [], 0
    for label in labels:
        letters = []
        for c in label:
            letters.append(c.lower() if k < len(bits) and bits[k] else c)
            k += 1
        cased.append("".join(letters))
    assert k >= len(bits) and [c.upper() for c in cased] == labels
    table = pd.DataFrame({"stage": cased, "n": [120] * len(cased)})
    rid = submit(airlock, people, "alice", csv_bytes(table))
    wait_state(airlock, rid, review.IN_REVIEW)
    labels_check = by_check(airlock, rid)["labels"]
    assert (
        labels_check["status"] == "fail"
        and "written otherwise than the catalogue writes them" in (labels_check["reason"])
    )
    assert {c["value"] for c in labels_check["details"]["respelt"]} == {c for c in cased if c not in labels}
    assert labels_check["details"]["cells"] == []  # every one of them is a label, but not as it leaves
    # Letters that case-fold to a label's: the long s, the Kelvin sign (K once the table is normalised).
    for header, cell in (("\u017ftage", "I"), ("stage", "\u212a"), ("stage", "ii")):
        odd = csv_bytes(pd.DataFrame({header: [cell, "II"], "n": [120, 48]}))
        assert by_check_of(airlock, people, odd)["labels"]["status"] == "fail", (header, cell)
    # As the catalogue writes them, with a header in its ordinary cases, the table passes.
    for header in ("stage", "Stage", "STAGE"):
        fine = csv_bytes(pd.DataFrame({header: labels, "N": [120] * len(labels)}))
        assert by_check_of(airlock, people, fine)["labels"]["status"] == "pass", header


def by_check_of(airlock, people, data: bytes) -> dict:
    rid = submit(airlock, people, "alice", data)
    wait_state(airlock, rid, review.IN_REVIEW)
    return by_check(airlock, rid)


def test_a_number_label_leaves_only_in_ascii_digits():
    """``\\d`` reads every script's digits, so a bin written ``٤٠-٤٩`` or ``４０-４９`` was a number label: the
    script of each digit (Arabic-Indic, full-width, Devanagari, ...) was a choice of some twenty, a few bits a
    digit that no steward reads off the table. A number label is now one only in ASCII digits."""
    known = disclosure.Labels.of(["stage"])
    for text in ("40-49", "90+", "3.5%", "1,204", "≥ 65"):
        assert disclosure.is_label(text, known) and disclosure.spelt_as_catalogued(text, known), text
    for text in ("٤٠-٤٩", "４０-４９", "४०", "4０", "1,2٠4", "９0+"):
        assert not disclosure.number_like(text), text
        assert not disclosure.is_label(text, known), text
    # In a header, a number among known words is ASCII too.
    assert disclosure.is_label("stage 2", known, header=True)
    assert not disclosure.is_label("stage ２", known, header=True)
    assert disclosure.is_label("Unnamed: 0", known, header=True)
    assert not disclosure.is_label("Unnamed: ٣", known, header=True)


def test_an_oversized_text_is_refused_from_its_size_and_one_account_reads_one_upload_at_a_time(airlock, people):
    """Three 48 MB texts filed at once took the airlock's memory from 225 MB to 1.75 GB before each was
    refused for being longer than a steward reads (decoded and normalised first), and a refused request
    costs no quota, so it could be repeated. A text is now refused from its byte size before it is decoded;
    and an account's uploads are read into their release form one at a time: the next waits its turn."""
    import threading

    from paitient.services.airlock.canonical import TEXT_MAX_BYTES, TEXT_MAX_CHARS

    big = b"x" * (TEXT_MAX_BYTES + 1)
    with pytest.raises(ChannelError, match=rf"the file has {len(big)} bytes, so more than the {TEXT_MAX_CHARS}") as e:
        submit(airlock, people, "alice", big, kind="other", name="notes.txt")
    assert e.value.code == "refused"
    # At the bound, a text of four-byte characters is read, and refused (or not) by its characters.
    assert len(("\U0001f600" * TEXT_MAX_CHARS).encode()) + 3 == TEXT_MAX_BYTES

    entered, release = threading.Event(), threading.Event()
    read = airlock._release_form

    def held(*args, **kwargs):
        entered.set()
        release.wait(30)
        return read(*args, **kwargs)

    airlock._release_form = held
    got: dict[str, object] = {}
    first = threading.Thread(target=lambda: got.setdefault("first", submit(airlock, people, "alice", GOOD)))
    first.start()
    try:
        assert entered.wait(30)
        airlock._release_form = read
        # The account's next request waits for the first to be read; another account's does not.
        second = threading.Thread(target=lambda: got.setdefault("second", submit(airlock, people, "alice", GOOD)))
        second.start()
        other = submit(airlock, people, "carol", GOOD, project="oncology")
        second.join(1)
        assert second.is_alive() and "second" not in got
    finally:
        release.set()
        first.join(30)
        airlock._release_form = read
    second.join(30)
    assert got["first"] and got["second"] and other


def test_a_category_a_later_version_generalised_away_is_no_label(site):
    """Attack (a review's): version 1 of a dataset catalogued a rare occupation (a value one patient held on
    many rows, when the catalogue counted rows); the data team published version 2 with it made 'other'. The
    airlock took labels from every version, so "astronaut" stayed a label a table could carry without a
    steward. Categories come from the current version now; every version's column names still count."""
    from paitient.services.airlock.core import Airlock
    from tests.airlock.helpers import publish

    frame = pd.DataFrame({"occupation": ["nurse", "other"], "ward": [1, 2]})
    base = site.data_root / "oncology" / "breast_cancer"
    for version, categories in ((1, ["astronaut", "nurse"]), (2, ["nurse", "other"])):
        where = publish(site, "oncology", "breast_cancer", frame, version=version)
        columns = [{"name": "occupation", "action": "keep", "categories": categories}]
        if version == 1:
            columns.append({"name": "old_ward", "action": "keep"})
        (where / "manifest.json").write_text(json.dumps({"version": version, "columns": columns}))
    os.symlink("versions/2", base / "current.new")
    os.replace(base / "current.new", base / "current")
    airlock = Airlock(site)
    assert airlock.catalogue_columns("oncology") == {
        "occupation": frozenset({"nurse", "other"}),
        "old_ward": frozenset(),
    }
