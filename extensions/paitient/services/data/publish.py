"""Where published datasets live, and how a new version appears there all at once or not at all.

    <data_root>/<project>/<dataset>/versions/<N>/data.parquet
                                              /manifest.json
    <data_root>/<project>/<dataset>/current -> versions/<N>

Who may read it: the project's group (:mod:`paitient.services.data.access`). Everything under
``<data_root>/<project>`` is root:<group>, directories 0750 and files 0440; the data root itself is 0711.

A version is written into a temporary directory beside ``versions/``, fsync'd, made read-only to the
project's group (files 0440, directory 0750) and renamed into place; then ``current`` is switched by
renaming a new symlink over it. A reader sees the previous version or the new one, never a part. A crash
leaves at most a ``.tmp-*`` directory, or a version in place that never became current, and the next
publication of that dataset removes either (a later version's number is not taken again).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from paitient.fsutil import fsync_dir, locked
from paitient.rules.pseudonyms import used_values_only_table

DATA_FILE = "data.parquet"
MANIFEST_FILE = "manifest.json"
_VERSION_RE = re.compile(r"^[1-9][0-9]*$")


def dataset_dir(data_root: Path, project: str, dataset: str) -> Path:
    return Path(data_root) / project / dataset


def versions(ds_dir: Path) -> list[int]:
    """Published version numbers of a dataset, ascending."""
    try:
        names = os.listdir(ds_dir / "versions")
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if _VERSION_RE.match(n))


def current_version(ds_dir: Path) -> int | None:
    try:
        target = os.readlink(ds_dir / "current")
    except (FileNotFoundError, OSError):
        return None
    name = target.rsplit("/", 1)[-1]
    return int(name) if _VERSION_RE.match(name) else None


def read_manifest(ds_dir: Path, version: int | None = None) -> dict[str, Any] | None:
    where = ds_dir / "current" if version is None else ds_dir / "versions" / str(version)
    try:
        return json.loads((where / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class Published:
    project: str
    dataset: str
    version: int
    path: Path
    manifest: dict[str, Any]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DIR_MODE = 0o750
FILE_MODE = 0o440
ROOT_MODE = 0o711


def _mkdir(path: Path, mode: int = DIR_MODE, gid: int = 0) -> None:
    path.mkdir(mode=mode, exist_ok=True)
    _own(path, mode, gid)


def _own(path: Path, mode: int, gid: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, 0, gid)
    os.chmod(path, mode)


class Publisher:
    """Publishes versions under ``data_root``; one publication per dataset at a time (``lock_dir`` flocks).

    ``group_of(project)`` gives the gid of the group that may read the project's data (made and filled
    by :func:`paitient.services.data.access.project_gid`); without it, only root reads what is published."""

    def __init__(self, data_root: Path, lock_dir: Path, group_of: Callable[[str], int] | None = None):
        self.data_root = Path(data_root)
        self.lock_dir = Path(lock_dir)
        self.group_of = group_of
        self._gid = 0

    def publish(
        self,
        project: str,
        dataset: str,
        table: pa.Table,
        manifest: dict[str, Any],
        before_switch: Callable[[int, Path], None] | None = None,
    ) -> Published:
        """Publish ``table`` as the next version; ``before_switch(version, path)`` runs once the version is
        in place but before ``current`` points to it: if it raises, the version is taken back."""
        self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with locked(self.lock_dir / f"ingest.{project}.{dataset}.lock"):
            self._gid = self.group_of(project) if self.group_of is not None else 0
            if not self.data_root.exists():
                self.data_root.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                _mkdir(self.data_root, ROOT_MODE)
            _mkdir(self.data_root / project, gid=self._gid)
            ds = dataset_dir(self.data_root, project, dataset)
            _mkdir(ds, gid=self._gid)
            _mkdir(ds / "versions", gid=self._gid)
            version = max(versions(ds), default=0) + 1  # a number a crashed publication took is not taken again
            self._clean_stale(ds)
            manifest = {**manifest, "version": version}
            tmp = ds / f".tmp-v{version}-{secrets.token_hex(4)}"
            tmp.mkdir(mode=0o700)
            final = ds / "versions" / str(version)
            try:
                self.write_version(tmp, table, manifest)
                self.place(tmp, final)
            except BaseException:
                _remove(tmp)
                raise
            try:
                if before_switch is not None:
                    before_switch(version, final)
                self.switch_current(ds, version)
            except BaseException:
                if current_version(ds) != version:  # not switched: take the unseen version back
                    _remove(final)
                    fsync_dir(ds / "versions")
                raise
            return Published(project, dataset, version, final, manifest)

    # The steps, separate so a test can make one fail.

    def write_version(self, tmp: Path, table: pa.Table, manifest: dict[str, Any]) -> None:
        data, man = tmp / DATA_FILE, tmp / MANIFEST_FILE
        # A dictionary is written as it is: values no row uses would be published with it.
        table = used_values_only_table(table)
        # Without the Arrow schema, dictionary-encoded columns read back as plain values. Min/max
        # statistics only for numbers and dates: for text (pseudonyms, categories) they cost a third
        # of the write and prune nothing.
        text = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
        stats = [
            f.name
            for f in table.schema
            if not any(t(f.type.value_type if pa.types.is_dictionary(f.type) else f.type) for t in text)
        ]
        pq.write_table(table, data, store_schema=False, write_statistics=stats)
        man.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for f in (data, man):
            _fsync_file(f)
            _own(f, FILE_MODE, self._gid)
        _own(tmp, DIR_MODE, self._gid)
        fsync_dir(tmp)

    def place(self, tmp: Path, final: Path) -> None:
        os.rename(tmp, final)
        fsync_dir(final.parent)

    def switch_current(self, ds: Path, version: int) -> None:
        link = ds / f".current-{secrets.token_hex(4)}"
        os.symlink(f"versions/{version}", link)
        if os.geteuid() == 0:
            os.chown(link, 0, self._gid, follow_symlinks=False)
        try:
            os.replace(link, ds / "current")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            raise
        fsync_dir(ds)

    def _clean_stale(self, ds: Path) -> None:
        """What a crashed publication left: its temporary folder and symlink, and a version it put in place
        but never made current (every publication makes its version current, so one above ``current`` never
        was; no reader has seen it)."""
        for p in ds.iterdir():
            if p.name.startswith(".tmp-v"):
                _remove(p)
            elif p.name.startswith(".current-") and p.is_symlink():
                p.unlink()
        current = current_version(ds)
        orphans = [v for v in versions(ds) if current is None or v > current]
        for v in orphans:
            _remove(ds / "versions" / str(v))
        if orphans:
            fsync_dir(ds / "versions")


def _remove(path: Path) -> None:
    if path.exists():
        os.chmod(path, 0o700)
        shutil.rmtree(path)
