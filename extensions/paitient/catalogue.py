"""What datasets exist, read from their manifests. Standard library only, so it is cheap to import.

Two layouts are understood:

- the data root on the host: ``<root>/<project>/<dataset>/current/manifest.json`` (``current`` links to
  ``versions/<N>``) - what ``paitient datasets`` reads;
- inside a kernel's sandbox: ``/data/<project>/<dataset>/manifest.json`` - the provisioner binds the
  current version's folder itself, so a running kernel keeps one fixed version.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_FILE = "data.parquet"
MANIFEST_FILE = "manifest.json"


class DatasetNotFound(LookupError):
    """No such dataset, or a name two projects share; the message lists what exists."""


@dataclass(frozen=True)
class DatasetInfo:
    project: str
    name: str
    path: Path
    """The folder holding data.parquet and manifest.json."""
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def version(self) -> int | None:
        return self.manifest.get("version")

    @property
    def rows(self) -> int | None:
        return self.manifest.get("rows")

    @property
    def columns(self) -> list[str]:
        return [c["name"] for c in self.manifest.get("columns", [])]

    @property
    def k(self) -> int | None:
        return self.manifest.get("k")

    @property
    def description(self) -> str:
        return self.manifest.get("description", "")

    @property
    def qualified(self) -> str:
        return f"{self.project}/{self.name}"


def _read(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def scan(root: str | os.PathLike[str]) -> list[DatasetInfo]:
    """Every readable dataset under ``root``, sorted by project and name."""
    root = Path(root)
    found: list[DatasetInfo] = []
    try:
        projects = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    for project in projects:
        try:
            datasets = sorted(d for d in project.iterdir() if d.is_dir() and not d.name.startswith("."))
        except OSError:
            continue
        for ds in datasets:
            for folder in (ds / "current", ds):
                manifest = _read(folder)
                if manifest is not None and (folder / DATA_FILE).is_file():
                    found.append(DatasetInfo(project.name, ds.name, folder, manifest))
                    break
    return found


def find(infos: list[DatasetInfo], name: str, project: str | None = None) -> DatasetInfo:
    """The dataset called ``name`` (or ``"project/name"``); ambiguous or unknown names raise with a list."""
    if project is None and "/" in name:
        project, name = name.split("/", 1)
    hits = [i for i in infos if i.name == name and (project is None or i.project == project)]
    if len(hits) == 1:
        return hits[0]
    available = ", ".join(i.qualified for i in infos) or "none"
    if not hits:
        where = f" in project {project!r}" if project else ""
        raise DatasetNotFound(f"no dataset {name!r}{where}; available: {available}")
    options = " or ".join(f"load({name!r}, project={h.project!r})" for h in hits)
    raise DatasetNotFound(f"dataset {name!r} exists in several projects; say which: {options}")
