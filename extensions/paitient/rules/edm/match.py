"""Which rows of which datasets a text reveals: tokens, fingerprints, index lookups, records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from paitient.rules.edm import compiled_match, compiled_records
from paitient.rules.edm import numbers as nb
from paitient.rules.edm.hashing import Keyed
from paitient.rules.edm.index import EDMIndex, Hits
from paitient.rules.edm.records import (
    COLUMN_LIKE_MIN,
    LAYOUTS,
    MIN_ROW_COLUMNS,
    WINDOW,
    Layout,
    record_cap,
    rows_in_records,
)
from paitient.rules.edm.tokens import Tokens, tokenize

_EMPTY = np.zeros(0, dtype=np.int64)
FUSED_TOKENS = 1 << 16
"""Texts of at most this many tokens count every layout in one compiled call, records found for all their
tokens (an output's usual size); longer ones a layout at a time, records found for the tokens hit."""


@dataclass
class _Queries:
    fp: np.ndarray  # uint64 fingerprints, words first, then numbers
    token: np.ndarray  # token id (words first, then numbers)
    exact: np.ndarray  # only exact entries may match (a padded print looked up at its natural precision)
    words: int  # the first ``words`` queries are words, the rest numbers


def _queries(tokens: Tokens, keyed: Keyed, tiers: tuple[int, ...]) -> _Queries:
    """The fingerprints of the words, then of the numbers at each precision to look up, in one compiled pass
    (:func:`paitient.rules.edm.compiled_match.queries`)."""
    t = tokens
    fp, token, exact = compiled_match.queries(
        t.view, t.word_start, t.word_len, t.value, t.lead, t.ndigits, tiers, keyed.lanes
    )
    return _Queries(fp=fp, token=token, exact=exact, words=len(t.word_start))


def _queries_arrays(tokens: Tokens, keyed: Keyed, tiers: tuple[int, ...]) -> _Queries:
    """:func:`_queries` in whole-array numpy, the reference."""
    nw = len(tokens.word_start)
    wfp = keyed.words(tokens.view, tokens.word_start, tokens.word_len) if nw else np.zeros(0, np.uint64)
    tok, packed, exact = nb.printed_queries(tokens.value, tokens.lead, tokens.ndigits, tiers)
    nfp = keyed.numbers(packed) if len(packed) else np.zeros(0, np.uint64)
    return _Queries(
        fp=np.concatenate((wfp, nfp)),
        token=np.concatenate((np.arange(nw, dtype=np.int64), nw + tok)),
        exact=np.concatenate((np.zeros(nw, bool), exact)),
        words=nw,
    )


class Scan:
    """One text, tokenised once, matched against any number of indexes."""

    def __init__(self, text: bytes | str):
        self.tokens = tokenize(text)
        self._queries: dict[str, _Queries] = {}
        self._layout: Layout | None = None

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = Layout(self.tokens)
        return self._layout

    def queries(self, keyed: Keyed) -> _Queries:
        """Fingerprints to look up, at every tier, shared by all indexes built with ``keyed``'s key."""
        q = self._queries.get(keyed.key_id)
        if q is None:
            q = self._queries[keyed.key_id] = _queries(self.tokens, keyed, nb.TIERS)
        return q

    def rows(self, index: EDMIndex) -> np.ndarray:
        """Sorted unique row ids of ``index``'s dataset that this text reveals."""
        q = self.queries(index.keyed)
        if not len(q.fp):
            return _EMPTY
        hits = index.lookup(q.fp)  # in any order: what follows marks, sorts or counts them
        if not len(hits.query):
            return _EMPTY
        revealed, candidates, tok, row, col = sift(hits, q, index.rows)
        if len(self.layout.start) > FUSED_TOKENS:
            return self.rows_by_layout(index, revealed, candidates, tok, row, col)
        if np.count_nonzero(candidates[row] & ~revealed[row]) < MIN_ROW_COLUMNS:
            return np.flatnonzero(revealed)
        return compiled_records.all_layouts(
            self.layout.all_records,
            (tok, row, col),
            revealed,
            candidates,
            index.rows,
            record_cap(len(index.columns)),
            len(self.tokens.word_start),
            WINDOW,
            COLUMN_LIKE_MIN,
            MIN_ROW_COLUMNS,
        )

    def rows_by_layout(
        self,
        index: EDMIndex,
        revealed: np.ndarray,
        candidates: np.ndarray,
        tok: np.ndarray,
        row: np.ndarray,
        col: np.ndarray,
        reference: bool = False,
    ) -> np.ndarray:
        """The rows of :meth:`rows` from the sifted hits, a layout at a time (:meth:`Layout.rows`, or with
        ``reference`` :meth:`Layout.rows_arrays`): each layout counts the hits of the rows the layouts before
        it left unrevealed. Texts of more than :data:`FUSED_TOKENS` tokens go this way, whose records are
        found only for the tokens hit until a layout has rows to count."""
        ncols = len(index.columns)
        everything = (tok, col)
        for name in LAYOUTS:
            if reference:
                left = np.flatnonzero(candidates[row] & ~revealed[row])
                if len(left) < len(row):
                    tok, row, col = tok[left], row[left], col[left]
            else:  # one compiled pass
                tok, row, col = compiled_match.unrevealed(candidates, revealed, tok, row, col)
            if len(row) < MIN_ROW_COLUMNS:
                break
            rows = self.layout.rows_arrays if reference else self.layout.rows
            revealed[rows(name, tok, row, col, index.rows, ncols, everything)] = True
        return np.flatnonzero(revealed)

    def rows_reference(self, index: EDMIndex) -> np.ndarray:
        """:meth:`rows` with the whole-array numpy reference of every step after the lookup: the sifting and
        each layout's counting."""
        q = self.queries(index.keyed)
        if not len(q.fp):
            return _EMPTY
        hits = index.lookup(q.fp)
        if not len(hits.query):
            return _EMPTY
        return self.rows_by_layout(index, *sift_arrays(hits, q, index.rows), reference=True)


def sift(hits: Hits, q: _Queries, nrows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The hits that count, sorted into what they reveal: (rows revealed by a pseudonym, as a mask over the
    ``nrows`` rows; rows with hits of MIN_ROW_COLUMNS columns, a mask too, the only ones a record can reveal;
    the token, row and column of each other hit, in the order of the hits). A padded print contradicts a
    rounded value, and a number is never a pseudonym (a fingerprint collision must not reveal a patient):
    such hits do not count. One compiled pass (:func:`paitient.rules.edm.compiled_match.sift`)."""
    return compiled_match.sift(
        hits.query, hits.row, hits.col, hits.primary, hits.exact, q.exact, q.words, q.token, nrows, MIN_ROW_COLUMNS
    )


def sift_arrays(
    hits: Hits, q: _Queries, nrows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`sift` in whole-array numpy, the reference."""
    wrong = (q.exact[hits.query] & ~hits.exact) | ((hits.query >= q.words) & hits.primary)
    if wrong.any():
        keep = ~wrong
        hits = Hits(hits.query[keep], hits.row[keep], hits.col[keep], hits.primary[keep], hits.exact[keep])
    revealed = np.zeros(nrows, dtype=bool)
    revealed[hits.row[hits.primary]] = True
    rest = np.flatnonzero(~hits.primary)
    tok, row, col = q.token[hits.query[rest]], hits.row[rest], hits.col[rest]
    # only rows with values of 3 columns somewhere in the text can be revealed by a record
    candidates = np.zeros(nrows, dtype=bool)
    candidates[rows_in_records(np.zeros(len(row), np.int64), row, col, nrows)] = True
    return revealed, candidates, tok, row, col


def reveal(text: bytes | str, indexes: Mapping[str, EDMIndex]) -> dict[str, np.ndarray]:
    """Dataset name -> sorted unique row ids (int64) that ``text`` reveals, for every index given."""
    scan = Scan(text)
    return {name: scan.rows(ix) for name, ix in indexes.items()}
