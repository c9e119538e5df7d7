"""The index build's compiled passes: a numeric column's entries as the interpreter's run of them gives, a text
column's rows grouped by value as a stable sort gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paitient.rules.edm import compiled
from paitient.rules.edm import numbers as nb
from paitient.rules.edm.columns import number_key
from paitient.rules.edm.compiled import number_entries, number_entries_py


def _decoded(packed: np.ndarray) -> list[tuple[int, int, int]]:
    """(tier, mantissa, exponent) of packed entries."""
    return [(int(p) & 7, (int(p) >> 3) & ((1 << 20) - 1), (int(p) >> 23) - 1024) for p in packed]


def _same(x: np.ndarray, thr: int, rounded: bool) -> tuple:
    key, _ = number_key(x)
    fast = number_entries(key, thr, rounded=rounded)
    slow = number_entries_py(key, thr, rounded=rounded)
    for a, b in zip(fast[:3], slow[:3], strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert fast[3:] == slow[3:]
    return fast


def _columns(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 4000
    return [
        rng.normal(50, 20, n).round(2),  # measurements with 4 significant digits
        rng.normal(0, 1, n),  # full precision
        rng.integers(0, 30, n).astype(float),  # few distinct values
        np.float32(rng.random(n)).astype(np.float64),  # went through float32
        rng.choice([0.1235, 0.12345, 999999.5, 9.9995, 17.99, 18.0, 1e-300, 1e300], n),  # midpoints, decades
        np.where(rng.random(n) < 0.3, np.nan, rng.lognormal(3, 2, n)),  # missing values
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thr", [1, 3, 10])
@pytest.mark.parametrize("rounded", [True, False])
def test_the_compiled_pass_gives_the_interpreters_entries(seed, thr, rounded):
    for x in _columns(seed):
        _same(x, thr, rounded)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=0, max_size=60),
    st.integers(min_value=1, max_value=4),
)
def test_any_column_gives_the_same_entries_compiled_and_interpreted(values, thr):
    _same(np.array(values, dtype=np.float64), thr, True)


def test_a_midpoint_value_is_indexed_at_both_neighbours_and_exactly_at_its_own_precision():
    x = np.array([0.1235, 7.0, 7.0, 7.0, 7.0])
    packed, position, exact, cells, used = _same(x, 3, True)
    entries = sorted(zip(_decoded(packed), position.tolist(), exact.tolist(), strict=True))
    assert entries == [
        ((3, 123, -3), 0, False),  # 0.1235 at 3 digits lies on the midpoint: the lower neighbour too
        ((3, 124, -3), 0, False),
        ((4, 1235, -4), 0, True),  # exactly, at its natural precision
    ]
    assert cells == 1 and used == {3, 4}  # 7.0 stands in four rows: not distinctive at threshold 3


_AFTER_WARM_UP = """
import numpy as np
import paitient.services.egress.service
from paitient.rules.edm import compiled_tokens
from paitient.rules.edm.tokens import tokenize, tokenize_arrays

compiled_tokens.warm_up()
text = "2019-03-04T10:00 P-7F3SJGQVFCSMMGDI 17.99 -0.0001184 0.12345678901234567 1e-320 [1, 2, 3] 174: 1.2.3"
fast, ref = tokenize(text), tokenize_arrays(text)
names = ("word_start", "word_len", "num_start", "value", "lead", "ndigits")
print(all(getattr(fast, k).dtype == getattr(ref, k).dtype for k in names)
      and all(getattr(fast, k).tobytes() == getattr(ref, k).tobytes() for k in names))
"""


def test_the_egress_service_tokenises_after_warm_up_as_the_reference_does():
    """A service loads the compiled tokenizer at start (warm_up); what it then scans is tokenised as the
    whole-array reference tokenises it."""
    out = subprocess.run([sys.executable, "-c", _AFTER_WARM_UP], capture_output=True, text=True, check=True, env=_env())
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize(("inline", "how"), [(False, "never"), (True, "always")])
def test_without_a_folder_for_compiled_code_each_process_compiles_anew(monkeypatch, inline, how):
    calls = []

    def njit(*, cache, inline):
        calls.append((cache, inline))
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return lambda function: function

    monkeypatch.setattr(compiled.numba, "njit", njit)
    assert compiled._jit(len, inline=inline) is len
    assert calls == [(True, how), (False, how)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(compiled.__file__).parents[3])}


def _numpy_key(lead: np.ndarray, s6: np.ndarray) -> np.ndarray:
    """The sort key written with whole-array numpy operations, as the compiled loop must give it."""
    m6 = np.rint(s6)
    close = np.abs(s6 - m6) <= s6 * nb.STORED_NOISE
    e6 = lead - 5
    top = m6 >= 1_000_000
    m6, e6 = np.where(top, 100_000.0, m6), e6 + top
    key = (e6 + 1024).astype(np.uint64) << np.uint64(20) | m6.astype(np.uint64)
    return key << np.uint64(28) | close.astype(np.uint64) << np.uint64(27) | np.arange(len(s6), dtype=np.uint64)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(min_value=1e-300, max_value=1e300), min_size=1, max_size=80))
def test_the_compiled_sort_key_is_the_whole_array_one(values):
    x = np.array(values + [999999.5, 9.999995, 0.1235, 1e-300, 1e300], dtype=np.float64)
    lead, s6 = nb.lead_and_six(x)
    assert np.array_equal(compiled.sort_key(lead, s6, nb.STORED_NOISE), _numpy_key(lead, s6))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 50), st.lists(st.integers(-1, 49), max_size=300))
def test_a_text_columns_rows_grouped_by_value_are_its_stable_argsort_without_nulls(n, raw):
    codes = np.array([min(c, n - 1) for c in raw], dtype=np.int64)
    first, rows = compiled.rows_by_code(codes, n)
    order = np.argsort(codes, kind="stable")
    assert np.array_equal(rows, order[codes[order] >= 0])
    assert np.array_equal(np.diff(first), np.bincount(codes[codes >= 0], minlength=n))
    assert first[0] == 0 and first[-1] == len(rows)
