"""Which datasets' rows an output reveals: the exact-data-match indexes of a user's projects, kept loaded.

The indexes are built root-side when a dataset version is published (:mod:`paitient.services.data`) and
hold keyed fingerprints only. The matcher loads the index of each dataset's *current* version, memory-mapped,
and notices a newer version when one is published.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from paitient.config import SiteConfig

RECHECK_SECONDS = 30.0
"""How often the matcher looks for a newer published version of a dataset."""


class MissingIndex(LookupError):
    """A dataset has no row index: outputs cannot be checked for its rows."""


@dataclass
class _Loaded:
    version: int | None
    index: Any
    checked: float


class Matcher:
    def __init__(self, site: SiteConfig, log: logging.Logger | None = None):
        self.site = site
        self.log = log or logging.getLogger("paitient.services.egress")
        self._loaded: dict[str, _Loaded] = {}
        self._lock = threading.Lock()

    def datasets(self, projects: Iterable[str]) -> list[str]:
        """``project/dataset`` for every dataset of ``projects`` the site configuration lists."""
        known = {p.name: p for p in self.site.projects}
        return [f"{p}/{ds}" for p in sorted(set(projects)) if p in known for ds in known[p].datasets]

    def _current_version(self, project: str, dataset: str) -> int | None:
        from paitient.services.data.publish import current_version, dataset_dir

        return current_version(dataset_dir(self.site.data_root, project, dataset))

    def _index(self, key: str) -> Any:
        from paitient.services.data.edmindex import load_index

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
            if version is None:
                index = None  # nothing published: nothing to reveal
            else:
                try:
                    index = load_index(self.site.state_dir, project, dataset, version)
                except FileNotFoundError:
                    raise MissingIndex(
                        f"{key} version {version} has no row index; the operator builds it with "
                        "`paitient datasets --reindex`"
                    ) from None
            self._loaded[key] = _Loaded(version, index, now)
            return index

    def reveal(self, text: bytes, projects: Iterable[str]) -> dict[str, np.ndarray]:
        """``project/dataset`` -> sorted unique row ids of that dataset that ``text`` reveals.

        Raises :class:`MissingIndex` when a dataset of the projects has a published version without an index
        (the caller then treats the output as unchecked).
        """
        from paitient.rules.edm import reveal

        indexes = {}
        for key in self.datasets(projects):
            index = self._index(key)
            if index is not None:
                indexes[key] = index
        if not indexes or not text:
            return {}
        found = reveal(text, indexes)
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
