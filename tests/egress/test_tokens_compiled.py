"""The compiled tokenizer gives the very arrays of the whole-array reference, on any text."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paitient.rules.edm import compiled_tokens
from paitient.rules.edm.tokens import lowered, tokenize, tokenize_arrays

FIELDS = ("word_start", "word_len", "num_start", "value", "lead", "ndigits")


def assert_same(text: bytes | str) -> None:
    """Every array of the compiled tokens equals the reference's: dtype, shape and bytes (values bitwise)."""
    fast, ref = tokenize(text), tokenize_arrays(text)
    assert fast.n == ref.n and np.array_equal(fast.buf, ref.buf)
    for name in FIELDS:
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), (name, a[:20], b[:20])


FRAGMENTS = [
    b"1e-05",
    b"174:",
    b'"174": ',
    b"'7':",
    b"v1.2.3",
    b"127.0.0.1",
    b"1.23456.7",
    b"12345.678.9",
    b"1e5e5",
    b"1e5.5",
    b".5",
    b"174.",
    b"5.e3",
    b"+.5e-3",
    b"-0.0",
    b"0.000",
    b"-0",
    b"1e400",
    b"-1e-400",
    b"1e-320",
    b"4.9e-324",
    b"2.4e-324",
    b"1.7976931348623157e308",
    b"1e308",
    b"9.99999999999999999999e307",
    b"9.9999999999999999e22",
    b"9.999999999999999e-5",
    b"0.09999999999999999",
    b"1e+0000005",
    b"1e-0000005",
    b"1E+03",
    b"9007199254740993",
    b"9007199254740992.5",
    b"123456789012345678",
    b"1234567890123456789",
    b"12345678901234567890123",
    b"0.12345678901234567891",
    b"00000000000000000000017.5",
    b"2019-03-04",
    b"2019-03-04T10:00:00.000",
    b"2019-03-04t10",
    b"1.2019-03-04T10:00",
    b"2019-03-04T10.5",
    b"04.03.2019",
    b"04.03.2019.",
    b"1.04.03.2019",
    b"04.03.2019.5",
    b"31.12.2020T",
    b"04.03.20191",
    b"04.03.2019,05.03.2019",
    b"P-7F3SJGQVFCSMMGDI",
    b"-123456",
    b"-1e-05",
    b"x86",
    b"feature_0",
    b"Hauptstra\xc3\x9fe",
    b"M\xc3\xbcller",
    b"[101, 102, 103, 104]",
    b"[1.0, 2.0, 3.5]",
    b'{"a": 17.99, "b": [0.1184, -3e-7], "174": 3.25}',
    b"0,P-6UV4SY2HBJJ35AP2,10,2010-12-05,50-59,15.19,20.12,136.6,0.05596999999999999,-0.6773001572372891,1\n",
    b"   feature_0  feature_1  derived_0\n0      13.97      19.26  -0.112267\n1      21.87      24.55   1.234e-05\n",
    b"epoch   12  loss 0.6612  acc 0.5270\n",
    b"array([0.77395605, 0.43887844, 0.85859792, 0.69736803])",
    b"<td>17.99</td></tr>",
    b"12:30",
    b"\\n",
    b"17,99",
    b"0,123",
    b"1,234",
    b"1234,567",
    b"12,34,56",
    b"12,34.5",
    b"1.5,25",
    b"1e5,25",
    b"5-17,99",
    b"17,99-10,38",
    b"17.99;10,38e-5;0,5",
    b"17.99. ",
    b"1.2.3.\n",
    b"5..",
    b"17.99-10.38+122.8",
    b"1.5e5-3",
    b"1.5-2.5.3",
    b"-.5-.5",
    b"17.99_10.38_122.8",
    b"x17.99 17.99mm feature_0 x86_64",
    b"17.99:10.38: {17.99: 'a'} {\"10.38\": 1} 12:30",
    b"1.799000D+01 1.0379999d1 12D+01 1.D5 2.5d",
    b"17,99D+01 1.2.3D5",
    b"\x1b[32m17.99\x1b[0m",
    b"\\u001b[1m10.38\\u001b[0m",
    "\uff11\uff17\uff0e\uff19\uff19 \u0661\u0667\u066b\u0669\u0669".encode(),
]
ALPHABET = list(b"0123456789.eE+-_:\"' \n\t,;[]{}()/\\TtaZ") + [0xC3, 0xBC, 0xFF, 0x80, 0x00, 0x1B]


def _decimal_strings() -> st.SearchStrategy[bytes]:
    """Number-like strings: optional sign, digits, point, digits, exponent, each part possibly missing."""
    digits = st.text(alphabet="0123456789", max_size=24)
    return st.builds(
        lambda sign, a, point, b, e, esign, c: (sign + a + point + b + e + esign + c).encode(),
        st.sampled_from(["", "", "-", "+"]),
        digits,
        st.sampled_from(["", ".", "."]),
        digits,
        st.sampled_from(["", "", "e", "E"]),
        st.sampled_from(["", "-", "+"]),
        st.text(alphabet="0123456789", max_size=8),
    )


def _printed_floats() -> st.SearchStrategy[bytes]:
    """Floats as programs print them: repr, %g, %e and %f at various precisions."""
    x = st.floats(allow_nan=False, allow_infinity=False)
    near = st.builds(lambda m, e: m * 10.0**e, st.floats(0.1, 10.0), st.integers(-30, 30))
    precision = st.integers(0, 20)
    return st.builds(
        lambda v, p, style: (repr(v) if style == "r" else f"{v:.{p}{style}}").encode(),
        st.one_of(x, near),
        precision,
        st.sampled_from(["r", "g", "e", "f"]),
    )


PIECES = st.one_of(
    st.sampled_from(ALPHABET).map(lambda c: bytes([c])),
    st.sampled_from(FRAGMENTS),
    _decimal_strings(),
    _printed_floats(),
    st.integers(-(10**25), 10**25).map(lambda i: str(i).encode()),
)
TEXTS = st.lists(PIECES, max_size=60).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXTS)
def test_any_text_gives_the_references_tokens(text):
    assert_same(text)


@settings(max_examples=100, deadline=None)
@given(st.lists(PIECES, max_size=40), st.sampled_from([" ", ", ", "\n", "\t", ": "]))
def test_separated_pieces_give_the_references_tokens(pieces, sep):
    assert_same(sep.encode().join(pieces))


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_each_fragment_alone_and_in_context(fragment):
    for text in (fragment, b" " + fragment + b" ", b"x" + fragment, fragment + b"_", b"-" + fragment, b"." + fragment):
        assert_same(text)


@pytest.mark.parametrize(
    "piece",
    [
        b"1 ",
        b"7,",
        b"1e-320 ",
        b"12345678901234567890 ",
        b"9007199254740993 ",
        b"0.1 0.2 1e400 ",
        b"abcd-efgh ",
        b"1 2 3 ",
    ],
)
def test_dense_texts_that_outgrow_the_first_arrays(piece):
    assert_same(piece * 5000)
    assert_same(b"x " * 3000 + piece * 3000)


def _table(rows: int, seed: int = 7) -> pd.DataFrame:
    """A table shaped like the benchmark's: pseudonyms, dates, age bands, 4-digit measurements, full-precision
    derived values, counts."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"))
    names = ["P-" + "".join(rng.choice(letters, 16)) for _ in range(rows // 3 + 1)]
    frame = pd.DataFrame(
        {
            "patient": [names[i // 3] for i in range(rows)],
            "diagnosis_date": pd.to_datetime(rng.integers(9_000, 19_000, rows), unit="D"),
            "age": rng.choice(["0-39", "40-49", "50-59", "80+"], rows),
        }
    )
    for j, s in enumerate((14.0, 655.0, 0.096, 0.049, 1.2)):
        x = np.abs(rng.normal(s, s / 4, rows)) + s / 100
        lead = np.floor(np.log10(x))
        frame[f"feature_{j}"] = np.round(x / 10 ** (lead - 3)) * 10 ** (lead - 3)
    for j in range(3):
        frame[f"derived_{j}"] = rng.normal(0, 1, rows)
    frame["tiny"] = rng.normal(0, 1, rows) * 1e-30
    frame["nodes"] = rng.poisson(3, rows)
    frame["target"] = rng.integers(0, 2, rows)
    return frame


def test_benchmark_like_outputs_give_the_references_tokens():
    frame = _table(3000)
    csv = io.StringIO()
    frame.to_csv(csv)
    numeric = frame.select_dtypes("number")
    texts = [
        csv.getvalue(),
        frame.to_json(orient="records"),
        frame.to_json(),
        repr(frame.head(50)),
        frame.head(200).to_string(),
        repr(numeric.describe()),
        repr(numeric.corr()),
        repr(numeric.to_numpy()[:100]),
        frame.head(100).to_html(),
    ]
    for text in texts:
        assert_same(text)
        assert_same(text[:10_000])


def test_numbers_the_compiled_pass_leaves_to_arrow_are_parsed_as_the_reference_does():
    # halfway between two doubles, beyond 18 digits, far exponents, subnormal, overflowing
    text = "9007199254740993 123456789012345678901 1.5e-30 1e-320 2.5e-324 1e400 3.3e+99 7.0e-23 17.99 1e22 1e23"
    assert_same(text)
    t = tokenize(text)
    assert list(t.value[:7]) == [9007199254740992.0, 1.2345678901234568e20, 1.5e-30, 1e-320, 5e-324, 3.3e99, 7e-23]
    assert list(t.value[7:]) == [17.99, 1e22, 1e23]
    assert list(t.lead) == [15, 20, -30, -320, -324, 99, -23, 1, 22, 23]


def test_the_exact_decimal_path_agrees_with_pythons_parse():
    """Mantissas up to 18 digits with exponents within 10**22 are parsed in the compiled pass (double-double
    arithmetic where the mantissa is past 2**53): the double nearest to the decimal, or NaN, never another."""
    rng = np.random.default_rng(5)
    mantissas = np.concatenate(
        (
            rng.integers(1, 2**53, 20_000, dtype=np.int64),
            rng.integers(2**53, 10**18, 60_000, dtype=np.int64),
            (rng.integers(2**51, 2**53, 5_000, dtype=np.int64) * 2 + 1) * 2**3,  # halfway integers
        )
    )
    exponents = rng.integers(-22, 23, len(mantissas))
    exponents[-5_000:] = 0
    decided = 0
    for m, e in zip(mantissas.tolist(), exponents.tolist(), strict=True):
        x = compiled_tokens._decimal(m, e)
        if not np.isnan(x):
            assert x == float(f"{m}e{e}"), (m, e)
            decided += 1
    assert decided > 0.9 * len(mantissas) - 5_000


def test_tokenizing_after_warm_up_gives_the_references_tokens():
    compiled_tokens.warm_up()
    assert_same(compiled_tokens._SAMPLE)
    assert_same("2019-03-04T10:00 P-7F3SJGQVFCSMMGDI 17.99 1e-320")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_the_compiled_case_folding_folds_what_the_reference_folds(data):
    buf = np.frombuffer(data + bytes(range(256)), dtype=np.uint8)
    folded = compiled_tokens.lowered(buf)
    assert folded.dtype == np.uint8 and np.array_equal(folded, lowered(buf))
    assert not np.any((folded >= 65) & (folded <= 90))  # no capital letter is left
