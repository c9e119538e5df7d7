"""Exact data match: which rows of a dataset an outgoing text reveals (issue 12, "Close the way out").

When a dataset version is published, :meth:`EDMIndex.build` fingerprints its distinctive values with
a secret key (:mod:`.index`); a root-side service keeps the index and the key and asks
:func:`reveal` about each text the egress gate sees. A row counts as revealed when one of its
pseudonyms appears, or when values of three of its columns appear together in one record
(:mod:`.records`). Numbers are compared to a few significant digits (:mod:`.numbers`), text as
case-folded words (:mod:`.tokens`). Pure: no files, no sockets; persistence lives with the data service.
"""

from paitient.rules.edm.hashing import KEY_BYTES, Keyed
from paitient.rules.edm.index import THRESHOLD, EDMIndex, IndexError_
from paitient.rules.edm.match import Scan, reveal
from paitient.rules.edm.records import MIN_ROW_COLUMNS, WINDOW

__all__ = [
    "KEY_BYTES",
    "MIN_ROW_COLUMNS",
    "THRESHOLD",
    "WINDOW",
    "EDMIndex",
    "IndexError_",
    "Keyed",
    "Scan",
    "reveal",
]
