"""The compiled lookups of a scan find the hits of the whole-array reference, and the scan reveals the same rows."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paitient.rules.edm import EDMIndex, Keyed, Scan, compiled_match
from paitient.rules.edm import numbers as nb
from paitient.rules.edm.index import _FP_SHIFT, FORMAT, Hits
from paitient.rules.edm.match import _Queries, _queries, _queries_arrays, sift, sift_arrays
from paitient.rules.edm.tokens import Tokens, tokenize

FP_SHIFT = int(_FP_SHIFT)


def walk(fps: np.ndarray, entries: np.ndarray, directory: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The lookup as the docstring states it, one query and one entry at a time: the hits in their order."""
    query, found = [], []
    for i, fp in enumerate(fps.tolist()):
        bucket, want = fp >> (64 - bits), (fp << bits) % (1 << 64) >> FP_SHIFT
        for e in entries[int(directory[bucket]) : int(directory[bucket + 1])].tolist():
            if e >> FP_SHIFT == want:
                query.append(i)
                found.append(e)
    return np.array(query, dtype=np.int64), np.array(found, dtype=np.uint64)


def in_order(hits: Hits) -> list[np.ndarray]:
    """The hits' arrays sorted by query, row, column and flags: the set of hits, whatever their order."""
    at = np.lexsort((hits.exact, hits.primary, hits.col, hits.row, hits.query))
    return [a[at] for a in (hits.query, hits.row, hits.col, hits.primary, hits.exact)]


def assert_same_hits(index: EDMIndex, fps: np.ndarray) -> Hits:
    fast, ref = index.lookup(fps), index.lookup_arrays(fps)
    for a, b in zip(in_order(fast), in_order(ref), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    return fast


@st.composite
def tables(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """A directory over entries (buckets of every length: empty, short, and long ones, as a pseudonym of
    many rows makes) whose fingerprint bits come from a small pool, and queries: hits, near misses (the
    right bucket, other bits), misses, repeats."""
    bits = draw(st.integers(min_value=1, max_value=8))
    rng = np.random.default_rng(draw(st.integers(min_value=0, max_value=2**32)))
    buckets = 1 << bits
    sizes = rng.geometric(draw(st.sampled_from([0.2, 0.4, 0.9])), buckets) - 1
    for b in rng.choice(buckets, draw(st.integers(min_value=0, max_value=3))):
        sizes[b] = rng.integers(5, 300)  # long buckets
    directory = np.concatenate(([0], np.cumsum(sizes))).astype(np.uint32)
    pool = rng.integers(0, 1 << 26, draw(st.integers(min_value=1, max_value=6)), dtype=np.uint64)
    n = int(directory[-1])
    entries = (pool[rng.integers(0, len(pool), n)] << np.uint64(FP_SHIFT)) | rng.integers(
        0, 1 << FP_SHIFT, n, dtype=np.uint64
    )
    nq = draw(st.integers(min_value=0, max_value=400))
    low = rng.integers(0, 1 << (FP_SHIFT - bits), nq, dtype=np.uint64)  # bits below those compared
    fp_bits = np.where(rng.random(nq) < 0.7, pool[rng.integers(0, len(pool), nq)], rng.integers(0, 1 << 26, nq))
    fps = (
        (rng.integers(0, buckets, nq).astype(np.uint64) << np.uint64(64 - bits))
        | (fp_bits.astype(np.uint64) << np.uint64(FP_SHIFT - bits))
        | low
    )
    if nq and draw(st.booleans()):
        fps = fps[rng.integers(0, nq, nq)]  # repeated queries
    return entries, directory, bits, fps


@settings(max_examples=200, deadline=None)
@given(tables())
def test_the_compiled_lookup_finds_the_hits_the_reference_finds(table):
    entries, directory, bits, fps = table
    query, found = compiled_match.lookup(fps, entries, directory, bits, FP_SHIFT)
    expected = walk(fps, entries, directory, bits)
    assert query.dtype == np.int64 and found.dtype == np.uint64
    assert np.array_equal(query, expected[0]) and np.array_equal(found, expected[1])
    keyed = Keyed(bytes(32))
    header = {"format": FORMAT, "key_id": keyed.key_id, "dir_bits": bits, "rows": 1 << 27, "columns": [], "tiers": []}
    assert_same_hits(EDMIndex(header, {"entries": entries, "dir": directory}, keyed), fps)


def test_a_bucket_longer_than_every_first_array_is_found_whole():
    entries = np.zeros(5000, dtype=np.uint64)
    query, found = compiled_match.lookup(np.zeros(3, np.uint64), entries, np.array([0, 5000, 5000], np.uint32), 1, 38)
    assert np.array_equal(query, np.repeat(np.arange(3), 5000)) and len(found) == 15_000
    query, found = compiled_match.lookup(np.zeros(0, np.uint64), entries, np.array([0, 5000, 5000], np.uint32), 1, 38)
    assert len(query) == len(found) == 0


def frame(rows: int, seed: int, crowd: int) -> pd.DataFrame:
    """Pseudonyms (one patient with ``crowd`` rows: a long bucket of equal fingerprints), dates, labels,
    4-digit measurements, full-precision values, counts."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"))
    names = ["P-" + "".join(rng.choice(letters, 12)) for _ in range(rows // 3 + 1)]
    patient = [names[0]] * crowd + [names[1 + i // 3] for i in range(rows - crowd)]
    df = pd.DataFrame(
        {
            "patient": patient,
            "date": pd.to_datetime(rng.integers(9_000, 19_000, rows), unit="D"),
            "age": rng.choice(["0-39", "40-49", "80+"], rows),
        }
    )
    for j, s in enumerate((14.0, 655.0, 0.096, 1.2)):
        x = np.abs(rng.normal(s, s / 4, rows)) + s / 100
        lead = np.floor(np.log10(x))
        df[f"feature_{j}"] = np.round(x / 10 ** (lead - 3)) * 10 ** (lead - 3)
    df["derived"] = rng.normal(0, 1, rows)
    df["nodes"] = rng.poisson(3, rows)
    return df


def texts(df: pd.DataFrame) -> list[str]:
    csv = io.StringIO()
    df.to_csv(csv)
    numeric = df.select_dtypes("number")
    return [
        csv.getvalue(),
        df.drop(columns=["patient"]).to_json(orient="records"),
        df.drop(columns=["patient"]).to_json(),
        repr(df.head(30)),
        df.T.to_string(),
        "\n".join(str(v) for v in numeric.to_numpy()[:40].ravel()),
        repr(numeric.describe()) + repr(numeric.corr()),
        df.head(40).to_html(),
        " ".join(df["patient"].head(200)),
    ]


@pytest.fixture(scope="module")
def indexed() -> tuple[pd.DataFrame, EDMIndex]:
    df = frame(1500, 11, 400)
    return df, EDMIndex.build(
        pa.Table.from_pandas(df, preserve_index=False), key=bytes(32), primary_columns=["patient"]
    )


def test_scans_find_the_references_hits(indexed):
    df, index = indexed
    long_bucket = False
    for text in texts(df):
        q = Scan(text).queries(index.keyed)
        hits = assert_same_hits(index, q.fp)
        long_bucket |= bool(np.bincount(hits.query).max(initial=0) >= 400)
    assert long_bucket  # the patient of 400 rows was looked up


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(min_value=0, max_value=2**16), st.integers(0, 150))
def test_any_key_and_table_give_the_references_hits(key, seed, crowd):
    df = frame(300, seed, crowd)
    index = EDMIndex.build(pa.Table.from_pandas(df, preserve_index=False), key=key, primary_columns=["patient"])
    for text in texts(df)[:4]:
        assert_same_hits(index, Scan(text).queries(index.keyed).fp)


def test_the_order_of_the_hits_does_not_change_the_rows_a_scan_reveals(indexed, monkeypatch):
    """Every use of the hits sorts, counts or marks them: the reference's order, the compiled one and a
    shuffled one reveal the same rows."""
    df, index = indexed
    rng = np.random.default_rng(0)
    revealed = [Scan(text).rows(index) for text in texts(df)]
    assert sum(len(r) > 0 for r in revealed) >= 7  # all but a summary (describe, corr) reveal rows

    def shuffled(self: EDMIndex, fps: np.ndarray) -> Hits:
        hits = EDMIndex.lookup_arrays(self, fps)
        return self.select(hits, rng.permutation(len(hits.query)))

    for lookup in (EDMIndex.lookup_arrays, shuffled, shuffled):
        monkeypatch.setattr(EDMIndex, "lookup", lookup)
        for text, rows in zip(texts(df), revealed, strict=True):
            assert np.array_equal(Scan(text).rows(index), rows)


def assert_same_sift(hits: Hits, q: _Queries, nrows: int) -> None:
    fast, ref = sift(hits, q, nrows), sift_arrays(hits, q, nrows)
    for a, b in zip(fast, ref, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_scans_sift_their_hits_as_the_reference_does(indexed):
    df, index = indexed
    for text in texts(df):
        q = Scan(text).queries(index.keyed)
        assert_same_sift(index.lookup(q.fp), q, index.rows)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.integers(0, 300), st.integers(1, 40), st.integers(1, 12))
def test_any_hits_are_sifted_as_the_reference_sifts_them(seed, n, nrows, ncols):
    """Hits of few rows and columns (rows with 1, 2, 3 and more columns, repeated columns), pseudonyms
    among them, queries of words and of numbers, exact-only ones, rounded entries."""
    rng = np.random.default_rng(seed)
    nq = int(rng.integers(1, 60))
    words = int(rng.integers(0, nq + 1))
    q = _Queries(
        fp=np.zeros(nq, np.uint64),
        token=rng.permutation(nq * 2)[:nq].astype(np.int64),
        exact=rng.random(nq) < 0.3,
        words=words,
    )
    hits = Hits(
        query=rng.integers(0, nq, n).astype(np.int64),
        row=rng.integers(0, nrows, n).astype(np.int64),
        col=rng.integers(0, ncols, n).astype(np.int64),
        primary=rng.random(n) < 0.1,
        exact=rng.random(n) < 0.5,
    )
    assert_same_sift(hits, q, nrows)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.integers(0, 400), st.integers(1, 60))
def test_the_pending_hits_are_those_of_rows_still_to_find_in_their_order(seed, n, nrows):
    """:func:`compiled_match.unrevealed` keeps what the reference's numpy narrowing keeps (rows_by_layout):
    the hits of rows that are candidates and not revealed, in the order given, none or all of them too."""
    rng = np.random.default_rng(seed)
    candidates = rng.random(nrows) < rng.choice([0.0, 0.5, 1.0])
    revealed = rng.random(nrows) < rng.choice([0.0, 0.3, 1.0])
    tok = rng.integers(0, 10**6, n).astype(np.int64)
    row = rng.integers(0, nrows, n).astype(np.int64)
    col = rng.integers(0, 500, n).astype(np.int64)
    left = np.flatnonzero(candidates[row] & ~revealed[row])
    got = compiled_match.unrevealed(candidates, revealed, tok, row, col)
    for a, b in zip(got, (tok[left], row[left], col[left]), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_sift_refuses_more_columns_than_a_row_word_holds():
    one = np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError, match="1 to 5 columns"):
        compiled_match.sift(one, one, one, one == 1, one == 0, one == 1, 1, one, 1, 6)


def assert_same_queries(tokens: Tokens, keyed: Keyed, tiers: tuple[int, ...] = nb.TIERS) -> _Queries:
    fast, ref = _queries(tokens, keyed, tiers), _queries_arrays(tokens, keyed, tiers)
    assert fast.words == ref.words
    for name in ("fp", "token", "exact"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    return fast


def test_scans_look_up_the_references_fingerprints(indexed):
    df, index = indexed
    for text in texts(df):
        assert_same_queries(tokenize(text), index.keyed)


PIECES = [
    "17.99",
    "17.990000",
    "17.989999771118164",
    "0.1235",
    "0.12345",
    "999999.5",
    "9.9995",
    "1.5E+03",
    "-0.0001184",
    "1e-320",
    "4.9e-324",
    "1.7976931348623157e308",
    "0.12345678901234567",
    "123456",
    "12",
    "2019-03-04",
    "2019-03-04T10:00",
    "P-7F3SJGQVFCSMMGDI",
    "Post-menopausal",
    "abc",
    "abcdefgh",
    "ABCDEFGHIJKLMNOPQ",
    "abcdefghijklmnop",
    "x" * 32,
    "x" * 33,
    "Y" * 64,
    "z" * 70,
]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES) | st.text("0123456789.eE+-_aZ", max_size=20), max_size=60),
    st.lists(st.sampled_from([" ", ", ", "\n", ": ", '"', "[", "]"]), min_size=1, max_size=5),
    st.binary(min_size=32, max_size=32),
    st.sets(st.sampled_from(nb.TIERS)),
)
def test_any_text_gives_the_references_fingerprints(pieces, gaps, key, tiers):
    text = "".join(p + gaps[i % len(gaps)] for i, p in enumerate(pieces))
    assert_same_queries(tokenize(text), Keyed(key), tuple(sorted(tiers)))


def near(mantissa: int, half: float, band: float) -> float:
    """A value within a few tie bands (or a few printed noises) of a midpoint (or of a shorter decimal)."""
    if half:
        return (mantissa + 0.5 + band * nb._TIE_BAND) / 1000
    return mantissa * (1 + band * nb.PRINTED_NOISE) / 1000


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.floats(min_value=5e-324, max_value=1.7976931348623157e308)
        | st.decimals(min_value=0, max_value=10**7, places=6).map(float)
        | st.integers(min_value=1, max_value=10**6).map(lambda m: (m + 0.5) / 10 ** (len(str(m)) + 1))
        | st.builds(near, st.integers(min_value=100, max_value=99_999), st.sampled_from([0.0, 0.5]), st.floats(-3, 3)),
        max_size=80,
    ),
    st.integers(min_value=0, max_value=2**32),
    st.binary(min_size=32, max_size=32),
)
def test_any_numbers_give_the_references_fingerprints(values, seed, key):
    """Any positive float printed with any number of digits: midpoints, values that are shorter decimals
    (padded prints), subnormal and huge ones."""
    value = np.array([v for v in values if v > 0], dtype=np.float64)
    rng = np.random.default_rng(seed)
    buf = np.zeros(64, dtype=np.uint8)
    none = np.zeros(0, dtype=np.int64)
    ndigits = rng.integers(0, 9, len(value)).astype(np.int64)
    tokens = Tokens(buf, 0, none, none, none, value, nb.leading_exponent(value), ndigits)
    assert_same_queries(tokens, Keyed(key))


def test_values_at_the_edges_of_the_tie_band_and_of_the_noise_give_the_references_fingerprints():
    rng = np.random.default_rng(2)
    mantissa = rng.integers(100, 100_000, 400)
    band = np.linspace(-2, 2, 401)
    value = np.concatenate(
        [(mantissa + 0.5 + b * nb._TIE_BAND) / 1000 for b in band[::8]]
        + [mantissa * (1 + b * nb.PRINTED_NOISE) / 1000 for b in band[::8]]
    )
    digits = np.tile(np.array([len(str(m)) for m in mantissa]), len(value) // len(mantissa))
    none = np.zeros(0, dtype=np.int64)
    for ndigits in (digits, digits + 1, np.full(len(value), 6)):
        tokens = Tokens(np.zeros(64, np.uint8), 0, none, none, none, value, nb.leading_exponent(value), ndigits)
        q = assert_same_queries(tokens, Keyed(bytes(32)))
        assert len(q.fp) > len(value)  # midpoints looked up at both neighbours, padded prints at two tiers


def test_after_warm_up_scanning_against_a_saved_index_compiles_nothing_more(demo):
    """The service warms the scanner up at start: an output scanned against the indexes it maps from disk
    (read-only arrays) then finds every compiled function ready for its arguments' types."""
    import numba

    from paitient.rules.edm import compiled_records, compiled_tokens
    from paitient.rules.edm import match as match_module

    modules = (compiled_tokens, compiled_match, compiled_records)
    for module in modules:
        module.warm_up()

    def signatures() -> dict[str, int]:
        return {
            f"{m.__name__}.{name}": len(f.signatures)
            for m in modules
            for name, f in vars(m).items()
            if isinstance(f, numba.core.registry.CPUDispatcher)
        }

    before = signatures()
    df = demo.frames["breast_cancer"]
    texts = [df.head().to_string(), df.iloc[:40].to_csv(), df.iloc[:40].to_json()]
    found = [len(Scan(t).rows(ix)) for t in texts for ix in demo.indexes.values()]
    with pytest.MonkeyPatch.context() as m:  # the layout-at-a-time path of long texts too
        m.setattr(match_module, "FUSED_TOKENS", -1)
        found += [len(Scan(t).rows(ix)) for t in texts for ix in demo.indexes.values()]
    assert max(found) >= 40  # the dumps were found: every path ran
    assert signatures() == before
