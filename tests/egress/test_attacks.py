"""Every way of printing a dataset that issue 12 names, tried on the real demo data: the rows are found.

Each test prints (part of) a published dataset the way a researcher's code could, and asserts how many
rows of each demo dataset the text reveals. The breast cancer table shares 150 patients (pseudonyms)
with the GBSG2 table of the same project; a print that shows the pseudonyms reveals those GBSG2 rows
too. Other tables are not revealed, but for a chance row or two: the dates are shifted with the
session's own pseudonym key, and now and then a printed date and two numbers equal three values of a
row of another table.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pandas as pd
import pytest

from paitient.rules.edm.tokens import unescape
from paitient.services.egress.service import next_tail, with_tail

SHARED_WITH_GBSG2 = 150
CHANCE = 2  # rows of a table that was not printed, matched by equal values


def without_id(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["patient"])


def numbers(df: pd.DataFrame) -> np.ndarray:
    return without_id(df).select_dtypes("number").to_numpy()


def shuffled_columns(df: pd.DataFrame) -> pd.DataFrame:
    return df[list(np.random.default_rng(3).permutation(df.columns))]


def show_all(df: pd.DataFrame) -> str:
    with pd.option_context("display.max_rows", None, "display.max_columns", None):
        return repr(df)


def printed(lines) -> str:
    out = io.StringIO()
    for line in lines:
        print(*line if isinstance(line, list | tuple) else (line,), file=out)
    return out.getvalue()


# (name, print of the breast cancer frame, rows of it revealed, GBSG2 rows revealed)
BREAST_CANCER = [
    ("to_csv()", lambda df: df.to_csv(), 569, SHARED_WITH_GBSG2),
    ("to_csv(index=False), no id", lambda df: without_id(df).to_csv(index=False), 569, 0),
    ("to_string(), no id", lambda df: without_id(df).to_string(), 569, 0),
    ("print(df), all rows shown", show_all, 569, SHARED_WITH_GBSG2),
    ("print(df), all rows, no id", lambda df: show_all(without_id(df)), 569, 0),
    *[
        (f"to_json(orient={o!r})", lambda df, o=o: without_id(df).to_json(orient=o), 569, 0)
        for o in ("columns", "index", "records", "split", "values", "table")
    ],
    ("to_json(lines=True)", lambda df: without_id(df).to_json(orient="records", lines=True), 569, 0),
    ("to_json(indent=2)", lambda df: without_id(df).to_json(orient="records", indent=2), 569, 0),
    ("to_html()", lambda df: without_id(df).to_html(), 569, 0),
    ("df.values.tolist()", lambda df: str(numbers(df).tolist()), 569, 0),
    ("df.to_dict()", lambda df: str(without_id(df).to_dict()), 569, 0),
    ("df.to_dict('list')", lambda df: str(without_id(df).to_dict("list")), 569, 0),
    ("df.T.to_string()", lambda df: without_id(df).T.to_string(), 569, 0),
    ("one value per line", lambda df: printed(v for row in numbers(df).tolist() for v in row), 569, 0),
    ("rows shuffled", lambda df: without_id(df).sample(frac=1, random_state=7).to_csv(), 569, 0),
    (
        "columns shuffled",
        lambda df: without_id(df)[list(np.random.default_rng(3).permutation(df.columns[1:]))].to_csv(),
        569,
        0,
    ),
    ("the id column alone", lambda df: df["patient"].to_string(), 569, SHARED_WITH_GBSG2),
    ("ids joined on one line", lambda df: " ".join(df["patient"]), 569, SHARED_WITH_GBSG2),
    ("%.3f", lambda df: printed([" ".join(f"{v:.3f}" for v in row) for row in numbers(df)]), 569, 0),
    ("%.4g", lambda df: printed([" ".join(f"{v:.4g}" for v in row) for row in numbers(df)]), 569, 0),
    ("round(x, 5)", lambda df: str([[round(v, 5) for v in row] for row in numbers(df).tolist()]), 569, 0),
    ("scientific %.4e", lambda df: printed([" ".join(f"{v:.4e}" for v in row) for row in numbers(df)]), 569, 0),
    ("float32 tensor-like", lambda df: str(numbers(df).astype(np.float32).astype(np.float64).tolist()), 569, 0),
    ("negated values", lambda df: without_id(df).select_dtypes("number").mul(-1).to_csv(), 569, 0),
    ("upper-cased ids", lambda df: "\n".join(df["patient"].str.lower()), 569, SHARED_WITH_GBSG2),
]


@pytest.mark.parametrize(("label", "show", "rows", "gbsg2"), BREAST_CANCER, ids=[a[0] for a in BREAST_CANCER])
def test_printing_the_breast_cancer_table_reveals_its_rows(demo, label, show, rows, gbsg2):
    df = demo.frames["breast_cancer"]
    got = demo.revealed(show(df))
    assert got["breast_cancer"] == rows
    assert gbsg2 <= got["gbsg2"] <= gbsg2 + CHANCE and got["diabetes"] <= CHANCE


def test_three_columns_without_the_id_reveal_nearly_every_row(demo):
    df = demo.frames["breast_cancer"]
    got = demo.revealed(df[["mean radius", "mean texture", "worst area"]].to_string())
    assert got["breast_cancer"] >= 0.95 * len(df)
    assert got["gbsg2"] <= CHANCE and got["diabetes"] <= CHANCE


def test_the_default_truncated_repr_reveals_only_the_rows_it_shows(demo):
    df = demo.frames["breast_cancer"]
    text = repr(df)  # 5 + 5 rows, and some of the columns
    shown = demo.rows(text, "breast_cancer")
    assert set(shown) <= {0, 1, 2, 3, 4, len(df) - 5, len(df) - 4, len(df) - 3, len(df) - 2, len(df) - 1}
    assert len(shown) == 10  # the pseudonyms are in the repr


def test_a_drip_of_single_rows_reveals_exactly_those_rows(demo):
    df = without_id(demo.frames["breast_cancer"])
    picks = [3, 141, 560]
    text = "\n".join(repr(df.iloc[i]) for i in picks)  # three Series reprs, one value per line
    assert list(demo.rows(text, "breast_cancer")) == picks


GBSG2 = [
    ("to_csv(index=False), no id", lambda df: without_id(df).to_csv(index=False)),
    ("to_string(), no id", lambda df: without_id(df).to_string()),
    ("to_json(orient='columns'), no id, epoch dates", lambda df: without_id(df).to_json()),
    ("dates and follow-up time only", lambda df: df[["surgery_date", "last_followup", "time"]].to_string()),
    ("ISO timestamps", lambda df: _timestamps(df).to_json(date_format="iso")),
    ("epoch milliseconds", lambda df: _timestamps(df).to_json(orient="values")),
    ("dates written day first with points (04.03.2019)", lambda df: _day_first(df).to_string()),
    ("the same in a report's sentences", lambda df: "\n".join(_sentences(_day_first(df)))),
]


def _timestamps(df: pd.DataFrame) -> pd.DataFrame:
    out = df[["surgery_date", "last_followup", "time"]].copy()
    for c in ("surgery_date", "last_followup"):
        out[c] = pd.to_datetime(out[c])
    return out


def _day_first(df: pd.DataFrame) -> pd.DataFrame:
    out = _timestamps(df)
    for c in ("surgery_date", "last_followup"):
        out[c] = out[c].dt.strftime("%d.%m.%Y")
    return out


def _sentences(df: pd.DataFrame) -> list[str]:
    return [
        f"Operated on {r.surgery_date}, followed up until {r.last_followup} ({r.time} days)." for r in df.itertuples()
    ]


@pytest.mark.parametrize(("label", "show"), GBSG2, ids=[a[0] for a in GBSG2])
def test_printing_the_gbsg2_table_reveals_its_rows(demo, label, show):
    df = demo.frames["gbsg2"]
    got = demo.revealed(show(df))
    assert got["gbsg2"] >= 0.95 * len(df), got
    assert got["breast_cancer"] <= CHANCE and got["diabetes"] <= CHANCE, got


DIABETES = [
    ("to_csv(), no id", lambda df: without_id(df).to_csv(), 0.95),
    ("to_string(), no id", lambda df: without_id(df).to_string(), 0.95),
    ("to_json(orient='records')", lambda df: without_id(df).to_json(orient="records"), 0.95),
    # without the dates, three distinctive values are fewer: many diabetes measurements (blood
    # pressure 101.0, total cholesterol 157.0, s4 4.0) are values several patients share
    ("measurements only, tolist()", lambda df: str(without_id(df).select_dtypes("number").to_numpy().tolist()), 0.75),
]


@pytest.mark.parametrize(("label", "show", "share"), DIABETES, ids=[a[0] for a in DIABETES])
def test_printing_the_diabetes_table_reveals_its_rows(demo, label, show, share):
    df = demo.frames["diabetes"]
    got = demo.revealed(show(df))
    assert got["diabetes"] >= share * len(df), got
    assert got["breast_cancer"] <= CHANCE + 1 and got["gbsg2"] <= CHANCE, got


PARTIAL = [
    ("to_string()", lambda part: part.to_string()),
    ("to_csv()", lambda part: part.to_csv()),
    ("to_json()", lambda part: part.to_json()),
    ("to_json(orient='records', indent=2)", lambda part: part.to_json(orient="records", indent=2)),
    ("to_html()", lambda part: part.to_html()),
    ("T.to_string()", lambda part: part.T.to_string()),
    ("to_dict('list')", lambda part: str(part.to_dict("list"))),
    ("print(df), all columns", lambda part: show_all(part)),
]


@pytest.mark.parametrize(("label", "show"), PARTIAL, ids=[a[0] for a in PARTIAL])
def test_a_part_of_the_table_reveals_the_rows_printed_and_hardly_another(demo, label, show):
    """Every printed row is found. Now and then another row is too: the breast cancer columns share
    value ranges, and three values printed in one row's line can equal another row's values in
    other columns (row 390 for this pick: its area error 11.88 is a printed mean radius)."""
    df = without_id(demo.frames["breast_cancer"])
    picks = sorted(np.random.default_rng(11).choice(len(df), 40, replace=False).tolist())
    got = set(demo.rows(show(df.iloc[picks]), "breast_cancer").tolist())
    assert set(picks) <= got
    assert len(got - set(picks)) <= 2


def _rows_of(part: pd.DataFrame, cell, sep: str = " ", end: str = "") -> str:
    """Each row on a line, each value printed by ``cell`` (from its repr), joined by ``sep``."""
    return "".join(sep.join(cell(repr(float(v))) for v in row) + end + "\n" for row in part.to_numpy())


_FULL_WIDTH = str.maketrans("0123456789.", "０１２３４５６７８９．")
_ARABIC_INDIC = str.maketrans("0123456789.", "٠١٢٣٤٥٦٧٨٩٫")


def _sentences_of(part: pd.DataFrame) -> str:
    return "\n".join(
        " ".join(f"{c} {float(v)!r}." for c, v in zip(part.columns, row, strict=True)) for row in part.to_numpy()
    )


# forms a researcher gets without trying to hide anything: a German locale, a terminal-colouring library,
# prose; and their neighbours
READABLE = [
    ("ANSI colour around each value", lambda part: _rows_of(part, lambda v: f"\x1b[32m{v}\x1b[0m")),
    (
        "ANSI colour, as the kernel message's JSON carries it",
        lambda part: json.dumps({"name": "stdout", "text": _rows_of(part, lambda v: f"\x1b[1;32m{v}\x1b[0m")}),
    ),
    ("to_csv(sep=';', decimal=',')", lambda part: part.to_csv(sep=";", decimal=",")),
    ("to_csv(sep='\\t', decimal=',')", lambda part: part.to_csv(sep="\t", decimal=",")),
    ("to_string(decimal=',')", lambda part: part.to_string(decimal=",")),
    ("to_html(decimal=',')", lambda part: part.to_html(decimal=",")),
    ("style.format(decimal=',', precision=6)", lambda part: part.style.format(decimal=",", precision=6).to_html()),
    ("values with ',' for the point", lambda part: _rows_of(part, lambda v: v.replace(".", ","), sep="\t")),
    ("full-width digits", lambda part: _rows_of(part, lambda v: v.translate(_FULL_WIDTH))),
    ("Arabic-Indic digits", lambda part: _rows_of(part, lambda v: v.translate(_ARABIC_INDIC))),
    ("a full stop after each value", _sentences_of),
    ("values joined by '-'", lambda part: _rows_of(part, lambda v: v, sep="-")),
    ("values joined by '+'", lambda part: _rows_of(part, lambda v: v, sep="+")),
    ("values joined by '-', a full stop after the row", lambda part: _rows_of(part, lambda v: v, sep="-", end=".")),
    ("values joined by '_'", lambda part: _rows_of(part, lambda v: v, sep="_")),
    ("values joined by ':'", lambda part: _rows_of(part, lambda v: v, sep=":")),
    (
        "inverted dict {value: column} per row",
        lambda part: "\n".join(str(_inverted(r)) for r in part.to_dict("records")),
    ),
    (
        'inverted JSON {"value": column} per row',
        lambda part: "\n".join(
            json.dumps({repr(v): c for v, c in _inverted(r).items()}) for r in part.to_dict("records")
        ),
    ),
    ("Fortran's D exponent", lambda part: _rows_of(part, lambda v: f"{float(v):.6E}".replace("E", "D"))),
    # punctuation that looks like '.' or '-' and characters that show as nothing
    ("'\u00b7' (middle dot) for the point", lambda part: _rows_of(part, lambda v: v.replace(".", "\u00b7"))),
    ("'\u2024' (one dot leader) for the point", lambda part: _rows_of(part, lambda v: v.replace(".", "\u2024"))),
    ("'\ufe52' (small full stop) for the point", lambda part: _rows_of(part, lambda v: v.replace(".", "\ufe52"))),
    ("'\u2027' (hyphenation point) for the point", lambda part: _rows_of(part, lambda v: v.replace(".", "\u2027"))),
    ("values joined by '\u2011' (non-breaking hyphen)", lambda part: _rows_of(part, lambda v: v, sep="\u2011")),
    ("values joined by '\u2212' (minus sign)", lambda part: _rows_of(part, lambda v: v, sep="\u2212")),
    (
        "a zero-width space and a soft hyphen in each value",
        lambda part: _rows_of(part, lambda v: f"{v[0]}\u200b{v[1:]}\u00ad"),
    ),
    # what JupyterLab's text renderer hides that no terminal grammar calls a sequence, and characters it
    # follows as a terminal does (a red team's finding: each value showed clean in Lab, and passed)
    ("'\\x1b[ 0m' in each value (Lab drops it)", lambda part: _rows_of(part, lambda v: f"{v[:2]}\x1b[ 0m{v[2:]}")),
    (
        "'\\x1b[ 0m' in each value, as the kernel message's JSON carries it",
        lambda part: json.dumps({"name": "stdout", "text": _rows_of(part, lambda v: f"{v[:2]}\x1b[ 0m{v[2:]}")}),
    ),
    ("a letter and a backspace after each value", lambda part: _rows_of(part, lambda v: f"{v}x\b")),
    (
        "a letter and a backspace after each value, in a notebook's JSON",
        lambda part: json.dumps({"output_type": "stream", "text": _rows_of(part, lambda v: f"{v}x\b")}),
    ),
    (
        "each line written in pieces over letters, a carriage return between them",
        lambda part: "".join(_overwritten(line) for line in _rows_of(part, lambda v: v).splitlines()),
    ),
    # a second red team's: what JupyterLab and Chromium show that the first fix did not read
    ("a two-byte letter and a backspace inside each value", lambda part: _rows_of(part, _cut("\u00e9\b"))),
    ("an emoji and two backspaces inside each value", lambda part: _rows_of(part, _cut("\U0001f600\b\b"))),
    (
        "an escape JupyterLab drops, taken back by backspaces first, in a notebook's JSON",
        lambda part: json.dumps({"output_type": "stream", "text": _rows_of(part, _cut("\x1b[\b\b"), sep="|")}),
    ),
    ("a variation selector inside each value", lambda part: _rows_of(part, _cut("\ufe0f"))),
    ("a tag character inside each value", lambda part: _rows_of(part, _cut("\U000e0041"))),
    ("a NUL inside each value", lambda part: _rows_of(part, _cut("\x00"))),
    ("a zero-width space between every two characters", lambda part: "\u200b".join(_rows_of(part, lambda v: v))),
    ("a form feed inside each value", lambda part: _rows_of(part, _cut("\x0c"))),
    ("a combining mark inside each value", lambda part: _rows_of(part, _cut("\u0301"))),
    # a third red team's: marks a reader takes for a point
    *(
        (f"U+{c:04X} for the point", lambda part, c=c: _rows_of(part, lambda v: v.replace(".", chr(c))))
        for c in (0x02D1, 0x2022, 0x2218, 0x25E6, 0x1427, 0x3002)
    ),
]


AS_JSON = [
    ("a letter and a backspace after each value", lambda part: _rows_of(part, lambda v: f"{v}x\b")),
    (
        "each line written in pieces over letters",
        lambda part: "".join(_overwritten(line) for line in _rows_of(part, lambda v: v).splitlines()),
    ),
    ("'\\x1b[ 0m' in each value", lambda part: _rows_of(part, _cut("\x1b[ 0m"))),
    ("an escape taken back by backspaces", lambda part: _rows_of(part, _cut("\x1b[\b\b"), sep="|")),
    (
        "each line over letters after a NUL in each value",
        lambda part: "".join(_overwritten(line) for line in _rows_of(part, _cut("\x00")).splitlines()),
    ),
]


@pytest.mark.parametrize(("label", "show"), AS_JSON, ids=[a[0] for a in AS_JSON])
@pytest.mark.parametrize("where", ["kernel message", "notebook"])
def test_control_characters_in_json_are_read_as_the_egress_service_reads_them(demo, label, show, where):
    """Through ``as_read``, what the egress service's matcher scans of a JSON output: the escapes undone (a
    carriage return a line's end there), and JupyterLab's view made from the JSON as it came (a carriage
    return still one). Before, the notebook path read a carriage return as a line's end only: the rows
    written over letters passed."""
    from paitient.rules.edm.tokens import as_read

    df = without_id(demo.frames["breast_cancer"])
    picks = sorted(np.random.default_rng(11).choice(len(df), 40, replace=False).tolist())
    text = show(df.iloc[picks].select_dtypes("number"))
    # (a notebook's output as the server reads and checks it: nbformat joins a text stored as lines)
    wrapped = {"name": "stdout", "text": text}
    if where == "notebook":
        wrapped = {"output_type": "stream", **wrapped}
    got = set(demo.rows(as_read(json.dumps(wrapped, ensure_ascii=False).encode()), "breast_cancer").tolist())
    assert set(picks) <= got
    assert len(got - set(picks)) <= CHANCE


def _halves_swapped(v: str) -> str:
    """Each value's halves in isolates, the second first, inside a right-to-left override."""
    return " ".join(f"\u202e\u2066{x[len(x) // 2 :]}\u2069\u2066{x[: len(x) // 2]}\u2069\u202c" for x in v.split())


BIDI = [
    ("a left-to-right mark between every two characters", lambda v: "\u200e".join(v)),
    ("each line written backwards inside a right-to-left override", lambda v: f"\u202e{v[::-1]}\u202c"),
    ("each value's halves in isolates, swapped, inside an override", _halves_swapped),
    ("each line backwards in HTML's <bdo dir=rtl>", lambda v: f"<bdo dir='rtl'>{v[::-1]}</bdo>"),
    ("each line in a <span dir=rtl> of swapped <bdi> halves", lambda v: f'<span dir="rtl"><bdi>{v[3:]}</bdi>'
     f"<bdi>{v[:3]}</bdi></span>"),
    ("each line backwards under CSS unicode-bidi", lambda v: f'<p style="unicode-bidi: bidi-override; '
     f'direction: rtl">{v[::-1]}</p>'),
]  # fmt: skip


@pytest.mark.parametrize(("label", "line"), BIDI, ids=[a[0] for a in BIDI])
def test_a_text_a_browser_may_draw_in_another_order_is_not_read_at_all(demo, label, line):
    """Attack (two red teams'): bidirectional controls, or their HTML and CSS forms, make a browser draw rows
    whole from a text that holds none in order. Such a text is refused as unreadable (the egress service
    withholds it); the same rows without them are found."""
    from paitient.rules.edm.tokens import UnreadableText

    df = without_id(demo.frames["breast_cancer"])
    picks = sorted(np.random.default_rng(11).choice(len(df), 40, replace=False).tolist())
    lines = _rows_of(df.iloc[picks].select_dtypes("number"), lambda v: v).splitlines()
    with pytest.raises(UnreadableText, match="bidirectional controls"):
        demo.rows("\n".join(line(v) for v in lines), "breast_cancer")
    assert set(picks) <= set(demo.rows("\n".join(lines), "breast_cancer").tolist())


def test_ordinary_html_and_text_with_the_words_are_read():
    """What the refusal looks for is no word an ordinary output uses: a directory listing, a plot's
    JavaScript options, a dir() of an object."""
    from paitient.rules.edm.tokens import normalised

    for text in (b"<td>directory</td><td>dirname: /data</td>", b"{direction: 'clockwise', dir: 'x'}",
                 b"<div style='unicode-bidi: normal'>17.99</div>", b"['__dir__', 'direction']"):  # fmt: skip
        assert normalised(text)


def test_a_literal_json_escape_after_each_value_in_a_file_is_read_as_written(demo):
    """Attack (a fourth red team's): a text file with ``\\u0041`` written after each value, which an editor
    shows as written and which the service's JSON unescaping would read as a glued ``A``. The server gives a
    file's body to the gate as a JSON string (as every other text), so the escape stays what it is."""
    from paitient.rules.edm.tokens import as_read

    df = without_id(demo.frames["breast_cancer"])
    picks = sorted(np.random.default_rng(11).choice(len(df), 40, replace=False).tolist())
    text = _rows_of(df.iloc[picks].select_dtypes("number"), lambda v: v + "\\u0041")
    assert len(set(demo.rows(as_read(text.encode()), "breast_cancer").tolist()) & set(picks)) < 20  # raw: glued
    got = set(demo.rows(as_read(json.dumps(text, ensure_ascii=False).encode()), "breast_cancer").tolist())
    assert set(picks) <= got


def _cut(middle: str):
    """Each value with ``middle`` in its middle."""
    return lambda v: v[: len(v) // 2] + middle + v[len(v) // 2 :]


def _overwritten(line: str) -> str:
    """``line`` as JupyterLab shows it, written as pieces that each start at the line's start (after a
    carriage return) with letters up to where the piece before it ends, the longest first: each piece's
    digits run from the middle of one value to the middle of the next, glued to the letters before them."""
    cuts = [0]
    for word in re.finditer(r"\S+", line):
        cuts.append(word.start() + len(word.group()) // 2)
    cuts.append(len(line))
    pieces = ["Z" * cuts[j] + line[cuts[j] : cuts[j + 1]] for j in range(len(cuts) - 1)]
    return "\r".join(reversed(pieces)) + "\n"


def _inverted(record: dict) -> dict:
    return {float(v): c for c, v in record.items()}


@pytest.mark.parametrize(("label", "show"), READABLE, ids=[a[0] for a in READABLE])
def test_readable_forms_reveal_the_rows_printed(demo, label, show):
    df = without_id(demo.frames["breast_cancer"])
    picks = sorted(np.random.default_rng(11).choice(len(df), 40, replace=False).tolist())
    got = set(demo.rows(show(df.iloc[picks].select_dtypes("number")), "breast_cancer").tolist())
    assert set(picks) <= got
    assert len(got - set(picks)) <= CHANCE


LOOK_ALIKES = [("\u00b7", "\u2011"), ("\u2024", "\u2011"), ("\ufe52", "\u2011"), ("\u00b7", "\u2010"), (".", "\u2212")]


@pytest.mark.parametrize(("dot", "dash"), LOOK_ALIKES, ids=[f"U+{ord(d):04X} U+{ord(h):04X}" for d, h in LOOK_ALIKES])
def test_a_whole_table_with_look_alike_points_and_hyphens_reveals_every_row(demo, dot, dash):
    """``df.to_csv()`` with its points and hyphens (the pseudonyms' too) written as marks a reader takes for
    them: read as ``.`` and ``-``, every row is found (before, 10 of 569)."""
    df = demo.frames["breast_cancer"]
    text = df.to_csv().replace(".", dot).replace("-", dash)
    assert len(demo.rows(text, "breast_cancer")) == len(df)


_CYRILLIC = str.maketrans("ABEKMHOPCTXY", "АВЕКМНОРСТХУ")
_GREEK = str.maketrans("ABEZHIKMNOPTYX", "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ")
_BOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "".join(chr(0x1D400 + i) for i in range(26)))
LETTER_FORMS = [("Cyrillic", _CYRILLIC), ("Greek", _GREEK), ("mathematical bold", _BOLD)]


@pytest.mark.parametrize("table", [t for _, t in LETTER_FORMS], ids=[label for label, _ in LETTER_FORMS])
def test_pseudonyms_spelt_with_look_alike_letters_reveal_their_rows(demo, table):
    """The pseudonyms with their Latin capitals written in other scripts' look-alikes (``Р-СNLSΥ6UКSОЕF4ТΒК``:
    a reader sees the pseudonym), beside an age band and a mean: every row is found (before, none)."""
    df = demo.frames["breast_cancer"]
    shown = zip(df["patient"], df["mean area"], df["mean texture"], strict=True)
    lines = [f"{p.translate(table)} {a:.1f} {t:.2f}" for p, a, t in shown]
    assert any(ch > "\u007f" for ch in lines[0])
    assert len(demo.rows("\n".join(lines[:60]), "breast_cancer")) == 60
    assert len(demo.rows(df.to_csv().translate(table), "breast_cancer")) == len(df)


_MATHEMATICAL = str.maketrans("0123456789", "".join(chr(0x1D7CE + d) for d in range(10)))
ESCAPED = [
    ("every character as \\u00XX", lambda df: "".join(f"\\u{ord(c):04x}" for c in df.to_csv())),
    ("full-width digits, escaped", lambda df: json.dumps(without_id(df).to_csv().translate(_FULL_WIDTH))[1:-1]),
    (
        "mathematical digits, escaped as surrogate pairs",
        lambda df: json.dumps(without_id(df).to_csv().translate(_MATHEMATICAL))[1:-1],
    ),
]


@pytest.mark.parametrize(("label", "escape"), ESCAPED, ids=[a[0] for a in ESCAPED])
def test_a_kernel_message_that_escapes_its_characters_reveals_every_row(demo, label, escape):
    """A message's JSON as a kernel may write it itself, characters as ``\\uXXXX`` escapes: the browser shows
    the characters, and so does what the gate reads (before, none of the rows was found)."""
    df = demo.frames["breast_cancer"]
    content = ('{"name": "stdout", "text": "' + escape(df) + '"}').encode()
    assert b"\\u" in content and len(demo.rows(unescape(content), "breast_cancer")) == len(df)


@pytest.mark.parametrize("per_message", [1, 2])
def test_a_row_printed_a_value_at_a_time_over_many_messages_is_found(demo, per_message):
    """``print(v, end=',', flush=True)``: each message holds one or two values, the browser shows them as
    one text. The service reads each piece after the tail of the output's text before it."""
    df = without_id(demo.frames["breast_cancer"])
    picks = sorted(np.random.default_rng(11).choice(len(df), 40, replace=False).tolist())
    values = df.iloc[picks].select_dtypes("number").to_numpy().tolist()
    printed = [repr(v) + ("\n" if j == len(row) - 1 else ",") for row in values for j, v in enumerate(row)]
    got: set[int] = set()
    tail = b""
    for k in range(0, len(printed), per_message):
        content = json.dumps({"name": "stdout", "text": "".join(printed[k : k + per_message])}).encode()
        scanned = with_tail(tail, content + b"\n{}")  # what the gate sends: content, metadata
        got |= set(demo.rows(unescape(scanned), "breast_cancer").tolist())
        tail = next_tail(scanned)
    assert set(picks) <= got
    assert len(got - set(picks)) <= CHANCE
