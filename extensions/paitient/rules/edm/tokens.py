"""Outgoing text as value tokens (numbers and words), and the grammar that finds them.

Two kinds of token, each with its byte offset:

- numbers: ``[sign] digits [. digits] [e [sign] digits]`` (also ``.5`` and ``174.``) standing alone,
  that is not glued to a letter, digit, ``_``, ``-``, ``+`` or ``.`` on either side, with a nonzero
  digit. ``17.99``, ``-0.0001184``, ``1.184e-01`` are numbers; ``2019-03-04``, ``v1.2.3``, ``x86``
  are not. A number followed by a colon (``"174":``, ``{174: ...}``, ``12:30``) is a key or a label,
  not a value. The sign is ignored. Three readings a German locale or prose gives: a decimal comma
  (``17,99``, ``-0,1184``) is a point where the comma cannot be a thousands group or a list's separator
  (:func:`paitient.rules.edm.compiled_tokens._comma_point_py`); a point before whitespace or the end is a
  full stop (``17.99.``); and a sign after the digits that follow a number's point begins the next
  number (``17.99-10.38+122.8``), where it cannot be an exponent's sign (``2019-03-04`` stays a word).
  A number with a point may be glued to ``_`` and followed by a colon (``17.99_10.38``, ``17.99:10.38``,
  ``{17.99: 'mean radius'}``): only whole numbers are labels there (``feature_0``, ``{174: ...}``). A
  Fortran exponent, ``D`` after the digits after a point, is an exponent (``1.799000D+01``).
- words: maximal runs of ``[A-Za-z0-9_-]`` of 4 to 64 bytes, ASCII case-folded, that are not part of
  a number (a pseudonym ``P-ABCDEFGHIJKLMNOP`` or an ISO date ``2019-03-04`` is one word). An integer
  of 4 or more digits written without sign is a word too (an identifier kept as text), and an ISO
  timestamp ``2019-03-04T10:00`` also gives the word of its date. A date written day first with points,
  ``04.03.2019``, is a word of its own (points and all) where it stands alone: not glued to a letter, digit,
  ``_`` or ``-``, nor to another number through a point (``1.04.03.2019``); a sentence's full stop after
  it is no glue. Its fingerprint is that of the same date in ISO form (:func:`dates_in_iso_order`), so it
  finds the rows whose date the index holds as ``2019-03-04``, with no entry more.

Non-ASCII bytes end a word (``Müller`` gives ``ller``): the index side tokenises cells the same way.
The text is first read as it is shown (:func:`normalised`): ANSI escape sequences dropped, the digits of
other scripts, the full-width forms and the look-alikes of number punctuation made ASCII, and characters
a browser shows as nothing dropped.

:func:`tokenize` finds them in compiled passes over the bytes (:mod:`.compiled_tokens`).
:func:`tokenize_arrays` is the reference it is held to, in whole-array numpy and Arrow operations:
candidates are runs of number bytes found with byte-wise masks (cheap: a comparison per byte); the
grammar is checked on each byte's neighbours and, for what that cannot see (two points, two
exponents), with Arrow's string kernels, which also parse the values (C++, a few ns per number).
From then on the printed side is normalised by the code the index side uses (:mod:`.numbers`); the
number of significant digits printed follows from the digits after the point and the value's
decimal exponent.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from paitient.rules.edm import compiled_tokens
from paitient.rules.edm.compiled_tokens import MIN_WORD, scan
from paitient.rules.edm.hashing import FRONT, MAX_WORD, PAD, word_view
from paitient.rules.edm.numbers import leading_exponent, powers_of_ten
from paitient.rules.shown import shown

_EXP_DIGITS = 4
_P10 = powers_of_ten(0, 23)


_ESCAPE_CHAR = rb"(?:\x1b|\\u001[bB])"
_ANSI = re.compile(
    _ESCAPE_CHAR
    + rb"(?:\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves
    + rb"|\][^\x07\x1b\n]{0,512}?(?:\x07|\\u0007|\x1b\\|\\u001[bB]\\\\))"  # OSC: titles, links
)
"""ANSI escape sequences, raw or as JSON writes them (``\\u001b``): terminal colours and the like."""


DOTS = (
    0x00B7, 0x0387, 0x2024, 0x2027, 0x2219, 0x22C5, 0x2E31, 0x30FB, 0xFE52, 0xFF0E, 0xFF65,
    0x02D1, 0x02D9, 0x0701, 0x0F0B, 0x1427, 0x16EB, 0x2022, 0x2218, 0x25E6, 0x2E30, 0x2E33, 0x3002, 0xA78F,
    0xFF61, 0x10101,
)  # fmt: skip
"""Marks that a reader takes for a decimal point: the middle dot (a traditional decimal point), the one dot
leader, the hyphenation point, the small and full-width full stops, the dot operators; the half triangular
colon, the dot above, the bullets, the ring operator, the ideographic full stops, the Syriac, Tibetan,
Canadian syllabics, runic, Latin sinological and Aegean dots (a red team's)."""
DASHES = (0x02D7, 0x2010, 0x2011, 0x2012, 0x2013, 0x2014, 0x2015, 0x2043, 0x2212, 0x2796, 0xFE58, 0xFE63, 0xFF0D)
"""Marks that a reader takes for ``-``: the hyphens (the non-breaking one looks the same), the dashes, the
minus signs."""
LETTERS = {
    # Cyrillic
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
    "Х": "X", "У": "Y", "Ү": "Y", "І": "I", "Ӏ": "I", "Ј": "J", "Ѕ": "S", "Ԛ": "Q", "Ԝ": "W", "Һ": "H",
    "З": "3", "Ѵ": "V",
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "х": "x", "у": "y", "і": "i", "ј": "j", "ѕ": "s",
    "һ": "h", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ѵ": "v",
    # Greek
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X", "ϒ": "Y",
    "ο": "o", "ν": "v", "ρ": "p", "κ": "k", "ι": "i",
    # Armenian, Cherokee and Latin letters that look like others
    "Օ": "O", "օ": "o", "Ս": "U", "ս": "u", "Ꭺ": "A", "Ᏼ": "B", "Ꮯ": "C", "Ꭼ": "E", "Ꮋ": "H", "Ꮶ": "K",
    "Ꮇ": "M", "Ꮲ": "P", "Ꭲ": "T", "Ꮪ": "S", "Ɩ": "l", "ǀ": "l",
}  # fmt: skip
"""Letters of other scripts that print as a Latin letter or digit (the confusables of Unicode's security
report that matter to pseudonyms, ``P-`` and base32): ``Р-СNLSΥ6UКSОЕF4ТΒК`` reads as a pseudonym. Letters
whose compatibility form is one ASCII letter or digit (``𝐏``, ``ℙ``, ``Ｐ``, ``²``, ``①``) are read as it too."""
LETTERS.update(
    (chr(c), latin)
    for c, latin in (
        # Lisu: its capitals are Latin ones
        (0xA4D0, "B"), (0xA4D1, "P"), (0xA4D2, "d"), (0xA4D3, "D"), (0xA4D4, "T"), (0xA4D6, "G"), (0xA4D7, "K"),
        (0xA4D9, "J"), (0xA4DA, "C"), (0xA4DC, "Z"), (0xA4DD, "F"), (0xA4DF, "M"), (0xA4E0, "N"), (0xA4E1, "L"),
        (0xA4E2, "S"), (0xA4E3, "R"), (0xA4E6, "V"), (0xA4E7, "H"), (0xA4EA, "W"), (0xA4EB, "X"), (0xA4EC, "Y"),
        (0xA4EE, "A"), (0xA4F0, "E"), (0xA4F2, "l"), (0xA4F3, "O"), (0xA4F4, "U"),
        # Coptic
        (0x03ED, "o"), (0x2C82, "B"), (0x2C85, "r"), (0x2C8E, "H"), (0x2C92, "l"), (0x2C93, "i"), (0x2C94, "K"),
        (0x2C98, "M"), (0x2C9A, "N"), (0x2C9E, "O"), (0x2C9F, "o"), (0x2CA2, "P"), (0x2CA3, "p"), (0x2CA4, "C"),
        (0x2CA5, "c"), (0x2CA6, "T"), (0x2CA8, "Y"), (0x2CA9, "y"), (0x2CAC, "X"), (0x2CBD, "w"), (0x2CCE, "P"),
        (0x2CCF, "p"), (0x2CD0, "L"),
        # Warang Citi
        (0x118A0, "V"), (0x118A2, "F"), (0x118A3, "L"), (0x118A4, "Y"), (0x118A6, "E"), (0x118A9, "Z"),
        (0x118AE, "E"), (0x118B2, "L"), (0x118B5, "O"), (0x118B8, "U"), (0x118BC, "T"), (0x118C0, "v"),
        (0x118C1, "s"), (0x118C2, "F"), (0x118C3, "i"), (0x118C4, "z"), (0x118C8, "o"), (0x118D7, "o"),
        (0x118D8, "u"), (0x118DC, "y"),
        # Carian, Lycian, Old Italic
        (0x102A0, "A"), (0x102A1, "B"), (0x102A2, "C"), (0x102A5, "F"), (0x102AB, "O"), (0x102B0, "M"),
        (0x102B1, "T"), (0x102B2, "Y"), (0x102B4, "X"), (0x102CF, "H"),
        (0x10282, "B"), (0x10286, "E"), (0x10287, "F"), (0x1028A, "l"), (0x10290, "X"), (0x10292, "O"),
        (0x10295, "P"), (0x10296, "S"), (0x10297, "T"),
        (0x10301, "B"), (0x10302, "C"), (0x10309, "l"), (0x10311, "M"), (0x10315, "T"), (0x10317, "X"),
        # Deseret, Osage, Elbasan
        (0x10404, "O"), (0x10415, "C"), (0x1041B, "L"), (0x10420, "S"), (0x1042C, "o"), (0x1043D, "c"),
        (0x10448, "s"),
        (0x104B4, "R"), (0x104C2, "O"), (0x104CE, "U"), (0x104EA, "o"), (0x104F6, "u"),
        (0x10513, "N"), (0x10516, "O"), (0x10518, "K"), (0x1051C, "C"), (0x1051D, "V"), (0x10525, "F"),
        (0x10526, "L"), (0x10527, "X"),
        # Miao, Tifinagh
        (0x16F08, "V"), (0x16F0A, "T"), (0x16F16, "L"), (0x16F28, "l"), (0x16F35, "R"), (0x16F3A, "S"),
        (0x16F40, "A"), (0x16F42, "U"), (0x16F43, "Y"),
        (0x2D38, "V"), (0x2D39, "E"), (0x2D4F, "l"), (0x2D54, "O"), (0x2D55, "Q"), (0x2D5D, "X"),
    )
)  # fmt: skip
"""And the look-alikes, after Unicode's confusables, of scripts in which a whole word can be written that reads
as a Latin one (Lisu's capitals are all Latin ones: ``ꓚꓳꓧꓳꓣꓔ`` reads ``COHORT``)."""
INVISIBLE = (0x00AD, 0x180E, 0x200B, 0x200C, 0x200D, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0xFEFF)
"""Characters a browser shows as nothing (the soft hyphen, except at a line break; the zero-width spaces,
joiners and invisible operators): ``17\u200b.99`` reads ``17.99``."""


SHOWN_FORMAT = frozenset(range(0x0600, 0x0606)) | {0x06DD, 0x070F, 0x0890, 0x0891, 0x08E2, 0x110BD, 0x110CD}
"""Format characters a browser draws (the number signs that stand before or over digits): not dropped."""


def _ascii_forms() -> dict[int, int | None]:
    """Non-ASCII characters that print as ASCII digits, letters or number punctuation: every decimal digit of
    Unicode (Arabic-Indic, Devanagari, full-width, ...), the full-width forms of ASCII, every character whose
    compatibility form is one ASCII letter or digit (mathematical, superscript, circled), the look-alike letters
    of other scripts (:data:`LETTERS`), the Arabic decimal and thousands separators, the look-alikes of ``.``,
    ``,``, ``+`` and ``-`` (:data:`DOTS`, :data:`DASHES`, and every character whose compatibility form is one
    of them: ``\ufe52``, ``\ufe50``, ``\ufe62``); and, as nothing, the characters a browser does not show
    (:data:`INVISIBLE`, and every other format character, combining mark and variation selector: the bidi
    marks, embeddings and isolates, the tags; but :data:`SHOWN_FORMAT`)."""
    table: dict[int, int | None] = {}
    for c in range(0x80, 0x20000):  # no decimal digit lies beyond
        d = unicodedata.decimal(chr(c), None)
        if d is not None:
            table[c] = 48 + d
        else:
            compatible = unicodedata.normalize("NFKC", chr(c))
            if compatible in (".", ",", "+", "-") or (
                len(compatible) == 1 and compatible.isascii() and compatible.isalnum()
            ):
                table[c] = ord(compatible)
    for c in range(0xFF01, 0xFF5F):
        table[c] = c - 0xFF01 + 0x21
    table[0x066B] = ord(".")
    table[0x066C] = ord(",")
    table.update({ord(k): ord(v) for k, v in LETTERS.items()})
    table.update(dict.fromkeys(DOTS, ord(".")))
    table.update(dict.fromkeys(DASHES, ord("-")))
    table.update(dict.fromkeys(INVISIBLE, None))
    for c in (*range(0x80, 0x20000), *range(0xE0000, 0xE0080), *range(0xE0100, 0xE01F0)):
        if c not in table and unicodedata.category(chr(c)) in ("Cf", "Mn", "Me") and c not in SHOWN_FORMAT:
            table[c] = None
    return table


_ASCII_FORMS = _ascii_forms()


def _first_bytes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which bytes begin the UTF-8 of a character of :data:`_ASCII_FORMS`, which pairs of bytes do, and
    which triples (sorted, as ``b0 << 16 | b1 << 8 | b2``): the curly quotes and the ellipsis share their
    first two bytes with the dashes."""
    lead = np.zeros(256, dtype=bool)
    pairs = np.zeros(1 << 16, dtype=bool)
    triples = set()
    for c in _ASCII_FORMS:
        e = chr(c).encode()
        lead[e[0]] = True
        pairs[e[0] << 8 | e[1]] = True
        if len(e) > 2:
            triples.add(e[0] << 16 | e[1] << 8 | e[2])
    return lead, pairs, np.array(sorted(triples), dtype=np.int64)


_LEAD, _PAIRS, _TRIPLES = _first_bytes()


def _has_forms(data: bytes) -> bool:
    """Whether ``data`` (not all ASCII) holds a character of :data:`_ASCII_FORMS`: the bytes of the common
    non-ASCII letters and symbols begin none, so most texts are done after the first look."""
    b = np.frombuffer(data, dtype=np.uint8)
    at = np.flatnonzero(_LEAD[b[:-1]])
    if not len(at):
        return False
    at = at[_PAIRS[(b[at].astype(np.int64) << 8) | b[at + 1]]]
    if not len(at):
        return False
    if (b[at] < 0xE0).any():  # a two-byte character: the pair is the character
        return True
    at = at[at + 2 < len(b)]
    three = (b[at].astype(np.int64) << 16) | (b[at + 1].astype(np.int64) << 8) | b[at + 2]
    i = np.minimum(np.searchsorted(_TRIPLES, three), len(_TRIPLES) - 1)
    return bool((_TRIPLES[i] == three).any())


def normalised(data: bytes) -> bytes:
    """The text as a reader sees it: without ANSI escape sequences (a coloured table prints
    ``\\x1b[32m17.99\\x1b[0m``), and with the digits of other scripts, the full-width forms and the look-alikes
    of ``.``, ``,``, ``+``, ``-`` as their ASCII characters (``１７．９９``, ``١٧٫٩٩``, ``17·99``,
    ``P‑7F3S...``), without the characters a browser does not show (``17\\u200b.99``). Where JupyterLab's
    text renderer shows the text otherwise (:func:`as_lab_shows`: escape sequences of a looser grammar, and
    backspaces and carriage returns that overwrite what came before), that view follows on a line of its own,
    so the rows either view shows are found. A plain ASCII text without escapes or control characters costs
    a few searches."""
    view = data
    if b"\x1b" in data or (b"\\" in data and b"\\u001" in data):
        view = _ANSI.sub(b"", data)
    if lab_view_signs(data):
        lab = as_lab_shows(data)
        if lab != view.replace(b"\r\n", b"\n"):
            view = view + b"\n" + lab
    if (not view.isascii() and _BIDI.search(view)) or _html_bidi(view):
        raise UnreadableText(
            "it holds bidirectional controls (right-to-left overrides, embeddings, isolates or marks, or HTML's "
            "bdo, bdi, dir=rtl or CSS direction), which can show its characters in another order than the "
            "workspace reads them"
        )
    if b"\x00" in view or b"\x0b" in view or b"\x0c" in view:  # drawn as nothing
        view = view.translate(None, b"\x00\x0b\x0c")
    if not view.isascii() and _has_forms(view):
        text = view.decode("utf-8", "surrogateescape")
        view = text.translate(_ASCII_FORMS).encode("utf-8", "surrogateescape")
    return view


_ESCAPES = (
    (b"\\n", b"\n"),
    (b"\\r", b"\n"),
    (b"\\t", b"\t"),
    (b'\\"', b'"'),
    (b"\\/", b"/"),
    (b"\\b", b"\b"),
    (b"\\f", b"\f"),
)
_UNICODE_ESCAPE = re.compile(rb"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})|\\u([0-9a-fA-F]{4})")
"""JSON's ``\\uXXXX``: a surrogate pair (a character beyond the BMP), or one code unit."""


def _unicode(m: re.Match[bytes]) -> bytes:
    high, low, one = m.groups()
    if one is None:
        code = 0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00)
    else:
        code = int(one, 16)
        if 0xD800 <= code < 0xE000:  # a lone surrogate: the browser shows the replacement character
            code = 0xFFFD
    return chr(code).encode()


def unescape(text: bytes, carriage_return: bytes = b"\n") -> bytes:
    """Kernel messages and notebooks arrive as JSON: a printed table is one string with ``\\n`` escapes.
    Undo the escapes so the row detection sees the text the browser will show: those that separate values
    (lines, tabs, quotes), and every ``\\uXXXX`` (a JSON writer may escape any character, ASCII ones too:
    ``\\u0031\\u0037`` is ``17``), surrogate pairs as the one character they make. Over-undoing (a literal
    backslash-n, or a literal ``\\u0031``, in the text) only splits a line or reads an escape as what it
    names; nothing is lost. A text without ``\\u`` pays one search for it. ``\\r`` becomes
    ``carriage_return``: a line's end for the text as it reads, a carriage return for JupyterLab's view of it
    (:func:`as_lab_shows`)."""
    for escaped, plain in _ESCAPES:
        if escaped in text:
            text = text.replace(escaped, carriage_return if escaped == b"\\r" else plain)
    if b"\\u" in text:
        # the escape JSON writers must use most (a terminal colour's ESC) first, without a call per match
        text = text.replace(b"\\u001b", b"\x1b").replace(b"\\u001B", b"\x1b")
        if b"\\u" in text:
            text = _UNICODE_ESCAPE.sub(_unicode, text)
    return text


def lab_view_signs(data: bytes) -> bool:
    """Whether ``data`` holds what can make JupyterLab show it otherwise than it reads: an escape character, a
    backspace, a carriage return, raw or as JSON writes them (a kernel message, a notebook). Substring
    searches: a tenth of a millisecond a megabyte of plain text, half of one of JSON."""
    if b"\x1b" in data or b"\x08" in data or b"\r" in data:
        return True
    return b"\\" in data and _JSON_SIGN.search(data) is not None


_JSON_SIGN = re.compile(rb"\\[bru]")
_JSON_QUOTE = re.compile(rb'(?<!\\)((?:\\\\)*)"')
_LAB_CSI = re.compile(rb"\x1b\[(?:(?!\xe2\x80[\xa8\xa9])[^\n\r])*?[@-~]")
"""JupyterLab's grammar of the escape sequences its text renderer drops (``ansiSpan``: an escape, ``[``, then
anything up to the first character from ``@`` to ``~`` on the same line), applied to the text as it escapes
it for HTML first: ``\\x1b[ 0m`` is dropped, though no terminal would take it for a sequence."""
_HTML_ESCAPES = ((b"&", b"&amp;"), (b"<", b"&lt;"), (b">", b"&gt;"), (b'"', b"&quot;"), (b"'", b"&#39;"))


def as_lab_shows(data: bytes) -> bytes:
    """``data`` as JupyterLab's output area shows it (JupyterLab 4's ``processText`` and ``ansiSpan``), with
    the JSON escapes of control characters (a notebook's outputs read through the contents API) read as the
    characters, and each JSON string on a line of its own (JupyterLab follows the control characters of an
    output's text, which a kernel message and a notebook carry as JSON); the text escaped for HTML, the escape
    sequences of its grammar dropped, the entities read back; then each backspace removes the character
    before it and the one after the cursor, each carriage return moves the cursor to the line's start, where
    what follows overwrites the line, and a line feed starts a new line at the end (:func:`.shown.follow`,
    which refuses a text that would cost too much to follow: :class:`.shown.TooManyOverwrites`). JupyterLab
    follows those as it adds an output and drops escape sequences when it draws it, so in that order."""
    if b"\\" in data:  # JSON: each string starts a text of its own (a carriage return in it goes back to its
        # start, not to the line's the JSON began on); then its escapes undone, a carriage return kept as one
        data = unescape(_JSON_QUOTE.sub(b'\\1\n"\n', data), carriage_return=b"\r")
    if b"\x08" in data or b"\r" in data:  # followed as the output is added, before it is drawn
        # (a half of a character a backspace left is a lone surrogate: written out as one, a byte no word has)
        data = shown(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogatepass")
    if b"\x1b" in data:  # when it is drawn
        for raw, entity in _HTML_ESCAPES:
            data = data.replace(raw, entity)
        data = _LAB_CSI.sub(b"", data)
        for raw, entity in reversed(_HTML_ESCAPES):
            data = data.replace(entity, raw)
    return data


def as_read(text: bytes) -> bytes:
    """What the egress service's row detection reads of an output that arrives as JSON (a kernel message, a
    notebook): the text with its escapes undone, and where JupyterLab would show it otherwise, JupyterLab's
    view of it made from the JSON as it came (a carriage return still one, each string from its start)."""
    scanned = unescape(text)
    if lab_view_signs(text):
        scanned = scanned + b"\n" + as_lab_shows(text)
    return scanned


_BIDI = re.compile(rb"\xd8\x9c|\xe2\x80[\x8e\x8f\xaa-\xae]|\xe2\x81[\xa6-\xa9]")
_BIDI_HTML = re.compile(
    rb"(?i:<bd[io]\b|\bdir\s*=\s*[\"']?\s*(?:rtl|auto)|direction\s*:\s*rtl|unicode-bidi\s*:(?!\s*normal))"
)
"""What can make a browser draw a text's characters in another order than the text holds them: the
explicit bidirectional controls of Unicode (U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069;
a right-to-left override draws a line written backwards forwards, isolates draw chunks of a value in the
order that makes it whole), and their HTML and CSS forms (:data:`_BIDI_HTML`: ``<bdo>``, ``<bdi>``,
``dir=rtl`` or ``auto``, ``direction: rtl``, a ``unicode-bidi`` other than ``normal``). Rows could be
drawn whole from a text that holds none in order, so a text with one is not read at all
(:class:`UnreadableText`): the egress service withholds it. Ordinary output holds none."""


def _html_bidi(view: bytes) -> bool:
    """Whether ``view`` holds an HTML or CSS form of :data:`_BIDI_HTML`: the search only where one of its
    words is there at all (a search of a lowered copy costs a twentieth of the pattern's)."""
    if b"<" not in view:
        return False
    low = view.lower()
    if b"<bd" not in low and b"dir" not in low and b"unicode-bidi" not in low:
        return False
    return _BIDI_HTML.search(view) is not None


class UnreadableText(ValueError):
    """A text whose characters a browser may draw in another order than it holds them (:data:`_BIDI`,
    :data:`_BIDI_HTML`)."""


def as_buffer(data: bytes | str) -> tuple[np.ndarray, int]:
    """The text's UTF-8 bytes behind FRONT and before PAD zero bytes (uint8), and the text's length."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    n = len(data)
    buf = np.zeros(FRONT + n + PAD, dtype=np.uint8)
    buf[FRONT : FRONT + n] = np.frombuffer(data, dtype=np.uint8)
    return buf, n


def _bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends of the runs of True in ``mask`` (whose first and last elements are False)."""
    m = mask.view(np.int8)
    edges = np.flatnonzero(m[1:] != m[:-1]) + 1
    return edges[0::2], edges[1::2]


def lowered(buf: np.ndarray) -> np.ndarray:
    """ASCII case-folded copy (A-Z to a-z, every other byte as it is)."""
    upper = (buf - np.uint8(65)) < 26
    result: np.ndarray = buf | (upper.view(np.uint8) << np.uint8(5))
    return result


def word_mask(buf: np.ndarray) -> np.ndarray:
    low = buf | np.uint8(32)
    result: np.ndarray = ((buf - np.uint8(48)) < 10) | ((low - np.uint8(97)) < 26) | (buf == 45) | (buf == 95)
    return result


def word_runs(buf: np.ndarray, word: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Runs of [A-Za-z0-9_-] of MIN_WORD..MAX_WORD bytes, then the dates, in the order of the text: the date
    of each ISO timestamp run, and each date written DD.MM.YYYY standing alone (see the module's grammar)."""
    word = word_mask(buf) if word is None else word
    ws, we = runs(word)
    ln = we - ws
    dates = [_dotted_dates(buf, word, ws[ln == 2])]
    keep = (ln >= MIN_WORD) & (ln <= MAX_WORD)
    ws, ln = ws[keep], ln[keep]
    ts = ws[ln > 10]
    if len(ts):
        digits = [(buf[ts + i] - np.uint8(48)) < 10 for i in (0, 1, 2, 3, 5, 6, 8, 9)]
        date = np.logical_and.reduce(digits) & (buf[ts + 4] == 45) & (buf[ts + 7] == 45)
        date &= (buf[ts + 10] | 32) == 116
        dates.append(ts[date])
    ds = np.sort(np.concatenate(dates))
    if len(ds):
        ws = np.concatenate((ws, ds))
        ln = np.concatenate((ln, np.full(len(ds), 10, dtype=ln.dtype)))
    return ws, ln


def dates_in_iso_order(low: np.ndarray, ws: np.ndarray, wl: np.ndarray) -> None:
    """Rewrite, in the case-folded copy ``low`` that words are fingerprinted from, each word that is a date
    written ``DD.MM.YYYY`` as ``YYYY-MM-DD`` (the same 10 bytes' place): both forms of a date then have one
    fingerprint. Words are runs without points, so a 10-byte word with a point is such a date."""
    at = ws[(wl == 10) & (low[ws + 2] == 46)]
    if not len(at):
        return
    old = low[at[:, None] + np.arange(10)]
    new = old[:, [6, 7, 8, 9, 2, 3, 4, 5, 0, 1]]
    new[:, [4, 7]] = 45
    low[at[:, None] + np.arange(10)] = new


def _dotted_dates(buf: np.ndarray, word: np.ndarray, two: np.ndarray) -> np.ndarray:
    """Which runs of two word bytes (their starts ``two``) begin a date ``DD.MM.YYYY`` standing alone."""
    if not len(two):
        return two.astype(np.int64)
    digit = [(buf[two + i] - np.uint8(48)) < 10 for i in (0, 1, 3, 4, 6, 7, 8, 9, 11)]
    ok = np.logical_and.reduce(digit[:8]) & (buf[two + 2] == 46) & (buf[two + 5] == 46) & ~word[two + 10]
    ok &= ~((buf[two + 10] == 46) & digit[8])
    ok &= ~((buf[two - 1] == 46) & ((buf[two - 2] - np.uint8(48)) < 10))
    result: np.ndarray = two[ok].astype(np.int64)
    return result


@dataclass
class Tokens:
    """The tokens of one text. Offsets are byte offsets into ``buf`` (the text starts at FRONT)."""

    buf: np.ndarray
    n: int
    word_start: np.ndarray
    word_len: np.ndarray
    num_start: np.ndarray
    value: np.ndarray
    """|value| of each number (float64)."""
    lead: np.ndarray
    """Decimal exponent of its first significant digit."""
    ndigits: np.ndarray
    """Significant digits as printed (``0.07871``: 4, ``1001.0``: 5, ``120``: 3)."""
    _view: np.ndarray | None = field(default=None, repr=False)

    @property
    def view(self) -> np.ndarray:
        """8-byte words of the case-folded text, for word fingerprints."""
        if self._view is None:
            low = compiled_tokens.lowered(self.buf)
            dates_in_iso_order(low, self.word_start, self.word_len)
            self._view = word_view(low)
        return self._view

    def __len__(self) -> int:
        return len(self.word_start) + len(self.num_start)


def tokenize(data: bytes | str) -> Tokens:
    """The tokens of ``data`` (:func:`normalised`), found in compiled passes over its bytes
    (:mod:`.compiled_tokens`)."""
    buf, n = as_buffer(normalised(_bytes(data)))
    return Tokens(buf, n, *scan(buf, n))


def tokenize_arrays(data: bytes | str) -> Tokens:
    """The tokens of ``data``, found with whole-array operations: the reference :func:`tokenize` is held to."""
    buf, n = as_buffer(normalised(_bytes(data)))
    b = buf
    isdig = (b - np.uint8(48)) < 10
    low = b | np.uint8(32)
    alpha = (low - np.uint8(97)) < 26
    under, minus = b == 95, b == 45
    word = isdig | alpha | minus | under
    nbuf = _fortran_exponents(_decimal_commas(b, isdig, word), isdig)
    ns, ne, plain, value, lead, nd = _numbers(nbuf, isdig, alpha, nbuf | np.uint8(32), under, minus)

    ws, wl = word_runs(b, word)
    if len(ws):
        # the "1184" of "0.1184" (and the "17" of "17.99") is no word: a run of digits next to a decimal
        # point that has a digit on its other side is part of a number
        we = ws + wl
        frac = (nbuf[ws - 1] == 46) & isdig[ws - 2] & isdig[ws]
        head = (nbuf[we] == 46) & isdig[we + 1] & isdig[we - 1]
        keep = ~(frac | head)
        signed = np.flatnonzero((b[ws] == 45) & isdig[ws + 1])  # "-123456", "-1e-05": whole numbers
        if len(signed) and len(ns):
            i = np.minimum(np.searchsorted(ns, ws[signed]), len(ns) - 1)
            keep[signed[ns[i] == ws[signed]]] = False
        if not keep.all():
            ws, wl = ws[keep], wl[keep]
    return Tokens(buf, n, ws, wl, ns, value, lead, nd)


def _decimal_commas(b: np.ndarray, isdig: np.ndarray, word: np.ndarray) -> np.ndarray:
    """``b``, or a copy of it with each decimal comma (``17,99``) a point: a comma between two runs of digits,
    the one before not after a point, a comma with a digit before it or a word byte but a sign's ``-``, the
    one after not before a word byte nor a point or comma and a digit, and the two no thousands group (1 to
    3 digits, the first not 0, then 3); :func:`paitient.rules.edm.compiled_tokens._comma_point`."""
    c = np.flatnonzero((b[1:-1] == 44) & isdig[:-2] & isdig[2:]) + 1
    if not len(c):
        return b
    pos = np.arange(len(b))
    last_other = np.maximum.accumulate(np.where(isdig, 0, pos))  # the last byte at or before that is no digit
    next_other = np.minimum.accumulate(np.where(isdig, len(b) - 1, pos)[::-1])[::-1]
    s = last_other[c - 1] + 1  # the first digit before the comma
    t = next_other[c + 1]  # the byte after the digits after it
    before = b[s - 1]
    ok = ~((before == 46) | ((before == 44) & isdig[s - 2]))
    ok &= ~word[s - 1] | ((before == 45) & ~word[s - 2])
    ok &= ~word[t] & ~(((b[t] == 44) | (b[t] == 46)) & isdig[np.minimum(t + 1, len(b) - 1)])
    ok &= (t - c - 1 != 3) | (c - s > 3) | (b[s] == 48)
    if not ok.any():
        return b
    out = b.copy()
    out[c[ok]] = 46
    return out


def _fortran_exponents(b: np.ndarray, isdig: np.ndarray) -> np.ndarray:
    """``b``, or a copy with each Fortran exponent's ``D`` an ``e`` (``1.799000D+01``): a ``d`` or ``D``
    after the digits that follow a number's point (or decimal comma: ``b`` has those as points), before a
    digit or a sign and a digit."""
    at = np.flatnonzero(((b[1:-2] | 32) == 100) & isdig[:-3]) + 1
    if not len(at):
        return b
    sign = (b[at + 1] == 43) | (b[at + 1] == 45)
    at = at[isdig[at + 1] | (sign & isdig[at + 2])]
    pos = np.arange(len(b))
    last_other = np.maximum.accumulate(np.where(isdig, 0, pos))
    at = at[b[last_other[at - 1]] == 46]
    if not len(at):
        return b
    out = b.copy()
    out[at] = 101
    return out


def _splits(b: np.ndarray, isdig: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Where a sign begins a number of its own: after the digits after a number's point (``17.99-10.38``)."""
    k = np.flatnonzero(sign[1:] & isdig[:-1]) + 1
    if not len(k):
        return k
    pos = np.arange(len(b))
    last_other = np.maximum.accumulate(np.where(isdig, 0, pos))
    result: np.ndarray = k[b[last_other[k - 1]] == 46]
    return result


_Numbers = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""Numbers found in a text: start, end, plain (digits only), |value|, lead, significant digits printed."""


def _numbers(
    b: np.ndarray, isdig: np.ndarray, alpha: np.ndarray, low: np.ndarray, under: np.ndarray, minus: np.ndarray
) -> _Numbers:
    """The numbers of the text: start, end, plain (digits only), mantissa, lead, exponent, digits."""
    dot = b == 46
    ee = low == 101
    sign = (b == 43) | minus
    # a point before whitespace or the end is a full stop (17.99. Next): no number byte
    after = b[np.minimum(np.arange(1, len(b) + 1), len(b) - 1)]
    stop = dot & ((after == 32) | (after == 10) | (after == 9) | (after == 13) | (after == 0))
    numc = isdig | (dot & ~stop) | ee | sign
    split = _splits(b, isdig, sign)
    starts_run = np.zeros(len(b), dtype=bool)
    starts_run[split] = True
    # what may not touch a number: letters (other than an exponent's e), '_'
    glue = (alpha & ~ee) | under
    # bytes that break the grammar where they stand, judged by their neighbours (slices of the padded
    # buffer: x(k) is the mask k bytes further on, aligned with the middle part m)
    n = len(b)

    def x(mask: np.ndarray, k: int) -> np.ndarray:
        return mask[8 + k : n - 8 + k]

    d, dt, sg, e = isdig, dot, sign, ee
    bad = np.zeros(n, dtype=bool)
    m = bad[8 : n - 8]
    m |= x(sg, 0) & ~(((~x(numc, -1) | x(starts_run, 0)) & (x(d, 1) | (x(dt, 1) & x(d, 2)))) | (x(e, -1) & x(d, 1)))
    m |= x(e, 0) & ~((x(d, -1) | (x(dt, -1) & x(d, -2))) & (x(d, 1) | (x(sg, 1) & x(d, 2))))
    m |= x(dt, 0) & ~(x(d, -1) | x(d, 1))
    # a second point after a short run of digits (1.2.3, 127.0.0.1); longer ones Arrow's parse refuses
    run = x(d, -1)
    for k in range(2, 6):
        m |= x(dt, 0) & run & x(dt, -k)
        run = run & x(d, -k)
    cs, ce = runs(numc)
    if len(split):
        cs, ce = np.sort(np.concatenate((cs, split))), np.sort(np.concatenate((ce, split)))
    # glued to a letter; glued to '_' or a key ("174": or 174:) where it has no point
    dots = np.cumsum(dot)
    pointed = dots[ce - 1] > dots[cs - 1]
    letter = glue & ~under
    ok = ~letter[cs - 1] & ~letter[ce] & ((~under[cs - 1] & ~under[ce]) | pointed)
    after = b[ce]
    ok &= (b[ce + ((after == 34) | (after == 39))] != 58) | pointed
    badpos = np.flatnonzero(bad & numc)
    if len(badpos):
        i = np.searchsorted(cs, badpos, "right") - 1
        hit = (i >= 0) & (badpos < ce[np.maximum(i, 0)])
        ok[i[hit]] = False
    sel = np.flatnonzero(ok)
    cs, ce = cs[sel], ce[sel]
    return _parse(b, cs, ce)


def _parse(b: np.ndarray, cs: np.ndarray, ce: np.ndarray) -> _Numbers:
    """Parse the candidate numbers [cs, ce) with Arrow (exactly rounded floats)."""
    empty = np.zeros(0, dtype=np.int64)
    if not len(cs):
        return empty, empty, empty.astype(bool), empty.astype(np.float64), empty, empty
    offsets = np.empty(2 * len(cs), dtype=np.int32)
    offsets[0::2] = cs
    offsets[1::2] = ce
    text = pa.StringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(b))
    cand = text.take(pa.array(np.arange(0, len(offsets), 2, dtype=np.int32)))
    # an exponent's e has a digit (or a point after one) before it and a digit (or sign) after it
    epos: np.ndarray = np.full(len(cs), -1, dtype=np.int64)
    low = b | np.uint8(32)
    es = np.flatnonzero(low[1:-2] == 101) + 1
    es = es[(((b[es - 1] - np.uint8(48)) < 10) | (b[es - 1] == 46)) & (b[es + 1] != 32)]
    if len(es):
        i = np.searchsorted(cs, es, "right") - 1
        inside = (i >= 0) & (es < ce[np.maximum(i, 0)])
        epos[i[inside]] = es[inside] - cs[i[inside]]
    try:
        value = pc.cast(cand, pa.float64()).to_numpy()
    except pa.ArrowInvalid:  # something the byte checks let through (a long 1.23456.7, 1e5e5): sort out
        ok = pc.count_substring(cand, ".").to_numpy() <= 1
        ok &= pc.add(pc.count_substring(cand, "e"), pc.count_substring(cand, "E")).to_numpy() <= 1
        dots = pc.find_substring(cand, ".").to_numpy()
        ok &= (epos < 0) | (dots < epos)
        keep = np.flatnonzero(ok)
        cand, cs, ce, epos = cand.take(pa.array(keep)), cs[keep], ce[keep], epos[keep]
        value = pc.cast(cand, pa.float64()).to_numpy()
    dpos: np.ndarray = pc.find_substring(cand, ".").to_numpy()
    has_e: np.ndarray = epos >= 0
    value = np.abs(value)
    usable = np.isfinite(value) & (value > 0)
    if not usable.all():
        keep = np.flatnonzero(usable)
        value, cs, ce, dpos, epos, has_e = (a[keep] for a in (value, cs, ce, dpos, epos, has_e))
    mant_end = np.where(has_e, epos, ce - cs)
    lf = np.where(dpos >= 0, mant_end - dpos - 1, 0)
    lead = leading_exponent(value)
    ndigits = lf + lead + 1
    if has_e.any():
        ie = np.flatnonzero(has_e)
        ndigits[ie] -= _exponents(b, cs[ie] + epos[ie] + 1, ce[ie])
    plain = (dpos < 0) & ~has_e & ((b[cs] - np.uint8(48)) < 10)
    counting = _counting(value)
    if counting.any():
        keep = np.flatnonzero(~counting)
        cs, ce, plain, value, lead, ndigits = (a[keep] for a in (cs, ce, plain, value, lead, ndigits))
    return cs, ce, plain, value, lead, ndigits


def _counting(value: np.ndarray) -> np.ndarray:
    """Numbers in a run of three or more that step by exactly 1 (row numbers, range()): labels."""
    step = np.zeros(len(value) + 1, dtype=bool)  # step[i]: value[i] - value[i - 1] == 1
    if len(value) > 1:
        step[1:-1] = np.diff(value) == 1
    two = step[:-1] & step[1:]  # value[i] is the middle of a step-by-1 triple
    out = two.copy()
    out[1:] |= two[:-1]
    out[:-1] |= two[1:]
    return out


def _exponents(b: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Signed integer after an exponent's e (its digits run from ``start`` to ``end``)."""
    neg = b[start] == 45
    start = start + ((b[start] == 45) | (b[start] == 43))
    value = np.zeros(len(start), dtype=np.int64)
    for j in range(6):
        more = start + j < end
        value = np.where(more, value * 10 + (b[np.minimum(start + j, len(b) - 1)].astype(np.int64) - 48), value)
    value = np.where(end - start > 6, 10**6, value)
    return np.where(neg, -value, value)
