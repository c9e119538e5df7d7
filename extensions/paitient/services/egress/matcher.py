"""Which datasets' rows an output reveals: the exact-data-match indexes of a user's projects, kept loaded.

The indexes are built root-side when a dataset version is published (:mod:`paitient.services.data`) and
hold keyed fingerprints only. The matcher loads the index of each dataset's *current* version, memory-mapped,
and notices a newer version when one is published. A current version without a usable index (or a missing
key) is reported to ``on_missing``, which the service gives to its :class:`~paitient.services.egress.indexer.Indexer`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from paitient.config import SiteConfig
from paitient.rules.edm import EDMIndex, reveal
from paitient.rules.edm.tokens import as_read
from paitient.services.data import rowindex
from paitient.services.data.publish import current_version, dataset_dir

RECHECK_SECONDS = 30.0
"""How often the matcher looks for a newer published version of a dataset."""


class MissingIndex(LookupError):
    """A dataset has no row index: outputs cannot be checked for its rows."""


@dataclass
class _Loaded:
    version: int | None
    index: EDMIndex | None
    checked: float


class Matcher:
    def __init__(
        self,
        site: SiteConfig,
        log: logging.Logger | None = None,
        *,
        on_missing: Callable[[str, str, int], None] | None = None,
    ):
        self.site = site
        self.log = log or logging.getLogger("paitient.services.egress")
        self.on_missing = on_missing
        self._loaded: dict[str, _Loaded] = {}
        self._lock = threading.Lock()
        self._index_key: bytes | None = None

    def datasets(self, projects: Iterable[str]) -> list[str]:
        """``project/dataset`` for every dataset of ``projects`` the site configuration lists."""
        known = {p.name: p for p in self.site.projects}
        return [f"{p}/{ds}" for p in sorted(set(projects)) if p in known for ds in known[p].datasets]

    def _current_version(self, project: str, dataset: str) -> int | None:
        return current_version(dataset_dir(self.site.data_root, project, dataset))

    def _index(self, key: str) -> EDMIndex | None:
        project, dataset = key.split("/", 1)
        now = time.monotonic()
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is not None and now - loaded.checked < RECHECK_SECONDS:
                return loaded.index
            version = self._current_version(project, dataset)
            if loaded is not None and loaded.version == version:
                loaded.checked = now
                return loaded.index
            index: EDMIndex | None = None  # nothing published: nothing to reveal
            if version is not None:
                try:
                    index = rowindex.load(rowindex.index_dir(self.site, project, dataset, version), self._key())
                except (rowindex.IndexRefused, MissingIndex) as e:
                    self._index_key = None  # read again next time: a rebuilt index may come with a new key
                    if self.on_missing is not None:
                        self.on_missing(project, dataset, version)
                    raise MissingIndex(f"{key} version {version}: {e}") from None
            self._loaded[key] = _Loaded(version, index, now)
            return index

    def _key(self) -> bytes:
        if self._index_key is None:
            try:
                self._index_key = rowindex.load_key(self.site)
            except rowindex.IndexRefused as e:
                raise MissingIndex(str(e)) from None
        return self._index_key

    def reveal(self, text: bytes, projects: Iterable[str]) -> dict[str, np.ndarray]:
        """``project/dataset`` -> sorted unique row ids of that dataset that ``text`` reveals.

        Raises :class:`MissingIndex` when a dataset of the projects has a published version without an index
        (the caller then treats the output as unchecked).
        """
        indexes = {}
        missing: MissingIndex | None = None
        for key in self.datasets(projects):
            try:
                index = self._index(key)
            except MissingIndex as e:  # each dataset is looked at, so that every missing index is asked for
                missing = missing or e
                continue
            if index is not None:
                indexes[key] = index
        if missing is not None:
            raise missing
        if not indexes or not text:
            return {}
        found = reveal(as_read(text), indexes)
        return {key: rows for key, rows in found.items() if len(rows)}

    def missing(self) -> list[str]:
        """Datasets of the site whose current version has no index (logged at start)."""
        out = []
        for key in self.datasets(p.name for p in self.site.projects):
            try:
                self._index(key)
            except MissingIndex:
                out.append(key)
        return out
