"""Keyed 64-bit fingerprints of normalised values, computed on whole numpy arrays at once.

A fingerprint is a secret-keyed mix of a normalised value; the index stores fingerprints, never values.
Two kinds share the 64-bit space, separated by their own key lanes:

- words (pseudonyms, ISO dates, labels): up to :data:`MAX_WORD` case-folded ASCII bytes, read as
  little-endian 64-bit words straight out of the byte buffer (an unaligned view), so a token of any
  length up to the limit costs a fixed handful of array operations;
- numbers: the triple (tier, mantissa, exponent) of :mod:`paitient.rules.edm.numbers`.

The mix is the finaliser of MurmurHash3 (xor-shift-multiply) over words xored with key lanes. It is
not a cryptographic MAC: the index and its key are kept apart from researchers by file permissions;
the key makes an index useless with another key and keeps values from being read off the index alone.
"""

from __future__ import annotations

import hashlib

import numpy as np

MAX_WORD = 64
"""Longest word (bytes) that is fingerprinted; longer runs are no value of a dataset cell."""
PAD = MAX_WORD + 16
"""Zero bytes appended to a buffer so that every 8-byte read of a token stays inside it."""
FRONT = 16
"""Zero bytes before a text, so that reads ending at a token's end never start before the buffer."""
KEY_BYTES = 32

_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_C3 = np.uint64(0x9E3779B97F4A7C15)
_S33, _S29, _S32, _S31 = np.uint64(33), np.uint64(29), np.uint64(32), np.uint64(31)
_BYTE_MASK = np.array([0] + [(1 << (8 * i)) - 1 for i in range(1, 8)] + [(1 << 64) - 1], dtype=np.uint64)


class Keyed:
    """Key lanes derived from a secret key; :meth:`words` and :meth:`numbers` give fingerprints."""

    def __init__(self, key: bytes):
        if len(key) < KEY_BYTES:
            raise ValueError(f"the row-detection key needs at least {KEY_BYTES} random bytes, got {len(key)}")
        lanes = hashlib.blake2b(b"row detection fingerprint lanes", key=key[:64], digest_size=64).digest()
        self.lanes = np.frombuffer(lanes, dtype="<u8").copy()
        self.key_id = hashlib.blake2b(b"", key=key[:64], digest_size=6, person=b"pt-edm-key").hexdigest()

    def words(self, view: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Fingerprints of the byte strings ``buffer[s:s+l]`` (l in 1..MAX_WORD) of an 8-byte view."""
        return word_hash(view, starts, lengths, self.lanes[0], self.lanes[1])

    def numbers(self, packed: np.ndarray) -> np.ndarray:
        """Fingerprints of packed (tier, mantissa, exponent) numbers (see ``numbers.pack``)."""
        h = packed ^ self.lanes[2]
        _fmix(h)
        h ^= self.lanes[3]
        _fmix(h)
        result: np.ndarray = h
        return result


def word_view(buf: np.ndarray) -> np.ndarray:
    """Every 8 consecutive bytes of ``buf`` (uint8, padded with PAD zero bytes) as one little-endian uint64."""
    return np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))


def _fmix(h: np.ndarray) -> None:
    h ^= h >> _S33
    h *= _C1
    h ^= h >> _S29
    h *= _C2
    h ^= h >> _S32


def _absorb(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    h ^= w
    h *= _C3
    h ^= h >> _S31
    return h


def word_hash(
    view: np.ndarray, starts: np.ndarray, lengths: np.ndarray, lane0: np.uint64, lane1: np.uint64
) -> np.ndarray:
    """The keyed hash of each ``[start, start+length)`` (length 1..MAX_WORD), exact on every byte.

    Reads the first and last 8 bytes (overlapping for short words, the first masked to the length),
    and for longer words the inner 8-byte words that cover the rest, then mixes them with the length.
    """
    starts = starts.astype(np.int64, copy=False)
    lengths = lengths.astype(np.int64, copy=False)
    with np.errstate(over="ignore"):
        h = lengths.astype(np.uint64) * _C3
        h ^= lane0
        first = view[starts] & _BYTE_MASK[np.minimum(lengths, 8)]
        _absorb(h, first)
        ends = starts + lengths
        # every word absorbs its last 8 bytes (zero when it has no more than 8): a fingerprint must not
        # depend on the other words hashed in the same call
        last = view[np.maximum(ends - 8, 0)]
        last[lengths <= 8] = 0
        _absorb(h, last)
        for lo, offsets in ((16, (8, -16)), (32, (16, 24, -32, -24))):
            sel = np.flatnonzero(lengths > lo)
            if not len(sel):
                break
            hs = h[sel]
            for off in offsets:
                base = starts[sel] if off > 0 else ends[sel]
                _absorb(hs, view[base + off])
            h[sel] = hs
        h ^= lane1
        _fmix(h)
    return h
